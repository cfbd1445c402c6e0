"""The socket under one upstream conversation: an asyncio protocol, cheap per exchange.

A chain exchanges a packet and its answer with its upstream for every command the upstream
wants to answer, a dozen or more per message. Streams (``StreamReader``/``StreamWriter``)
cost a future and several calls per read and per drain; :class:`Link` feeds received bytes
straight into the MTA-side state machine and wakes the one exchange waiting for them, and
its deadline is one timer handle rather than an ``asyncio.timeout`` block.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Final, cast

from milterapp.protocol.mta import MtaConnection
from milterapp.spec import ConnectionSpec

__all__ = ["QUOTED", "Link", "connect", "open_stream"]

#: The read buffer of a stream opened by open_stream().
_READ_SIZE: Final = 65536
#: How many of the first bytes received are kept, to quote an answer that is not a milter's.
QUOTED: Final = 40


class Link(asyncio.Protocol):
    """One upstream socket. Bytes received go to ``mta``; :meth:`wait` returns when more
    came, the peer closed (:attr:`ended`), or :meth:`expire` was called (:attr:`expired`)."""

    def __init__(self, mta: MtaConnection) -> None:
        self.mta = mta
        self.transport: asyncio.Transport | None = None
        #: The first bytes received (up to QUOTED + 1).
        self.head = b""
        #: The peer closed its side, or the connection was lost (``error``: why, if known).
        self.ended = False
        self.error: BaseException | None = None
        self.expired = False
        self._waiter: asyncio.Future[None] | None = None
        self._writable: asyncio.Future[None] | None = None

    # --- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (uvloop's transports do not derive from asyncio's classes.)
        self.transport = cast("asyncio.Transport", transport)

    def data_received(self, data: bytes) -> None:
        if len(self.head) <= QUOTED:
            self.head = (self.head + data)[: QUOTED + 1]
        self.mta.receive_data(data)
        self._wake()

    def eof_received(self) -> bool:
        self.ended = True
        self._wake()
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.ended = True
        self.error = self.error or exc
        self._wake()
        writable, self._writable = self._writable, None
        if writable is not None and not writable.done():
            writable.set_result(None)

    def pause_writing(self) -> None:
        self._writable = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        writable, self._writable = self._writable, None
        if writable is not None and not writable.done():
            writable.set_result(None)

    # --- for the conversation ------------------------------------------------------------

    async def wait(self) -> None:
        """Until bytes arrive, the peer ends the connection, or :meth:`expire` is called."""
        waiter = self._waiter = asyncio.get_running_loop().create_future()
        try:
            await waiter
        finally:
            self._waiter = None

    async def write(self, data: bytes) -> None:
        """Send ``data``; returns at once unless the socket's buffer is full."""
        transport = self.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("the connection is closed")
        transport.write(data)
        writable = self._writable
        if writable is not None:
            await writable
            if self.expired:
                raise TimeoutError

    def expire(self) -> None:
        """The deadline passed: wake the exchange waiting, for an answer or for the socket
        to take more (a timer calls this)."""
        self.expired = True
        self._wake()
        writable = self._writable
        if writable is not None and not writable.done():
            writable.set_result(None)

    def abort(self) -> None:
        """Close at once."""
        if self.transport is not None:
            self.transport.abort()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


async def connect(spec: ConnectionSpec, mta: MtaConnection) -> Link:
    """Connect to the milter at ``spec`` (unix socket, IPv4 or IPv6 as the spec says).
    Unbounded: the caller sets a deadline."""
    loop = asyncio.get_running_loop()
    if spec.scheme == "unix":
        _, link = await loop.create_unix_connection(lambda: Link(mta), spec.path)
    else:
        host, port = spec.connect_host, spec.port
        assert host is not None  # (inet specs always have both)
        assert port is not None
        family = socket.AF_INET6 if spec.scheme == "inet6" else socket.AF_INET
        _, link = await loop.create_connection(lambda: Link(mta), host, port, family=family)
    return link


async def open_stream(
    spec: ConnectionSpec, *, limit: int = _READ_SIZE
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect to the milter listening at ``spec`` (a unix socket, or IPv4 or IPv6 as the
    spec says); ``limit`` is the reader's buffer limit. Unbounded: callers set a deadline."""
    if spec.scheme == "unix":
        return await asyncio.open_unix_connection(spec.path, limit=limit)
    family = socket.AF_INET6 if spec.scheme == "inet6" else socket.AF_INET
    return await asyncio.open_connection(spec.connect_host, spec.port, family=family, limit=limit)
