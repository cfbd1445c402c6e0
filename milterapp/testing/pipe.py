"""An in-memory connection: an asyncio stream pair on the MTA's end, a protocol on the other.

The milter's end is an :class:`asyncio.Protocol` (the server's connection handler) given a
transport that behaves as a socket's does: writes arrive at the peer in order and later, not
inside the writer's call; ``pause_reading`` holds what the peer sends until
``resume_reading``; closing one end gives the other end of file. So tests run the code that
serves real MTAs, unchanged.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any, Final

__all__ = ["READ_SIZE", "StreamPair", "connect_protocol"]

StreamPair = tuple[asyncio.StreamReader, asyncio.StreamWriter]
#: How much the testing kit's MTA side reads at once (and its streams buffer).
READ_SIZE: Final = 256 * 1024


class _ProtocolEnd(asyncio.Transport):
    """The milter's end: writes go into the MTA's reader; reads come from :class:`_StreamEnd`."""

    def __init__(
        self,
        protocol: asyncio.Protocol | asyncio.BufferedProtocol,
        peer: asyncio.StreamReader,
        extra: dict[str, Any],
    ) -> None:
        super().__init__(extra)
        self._protocol = protocol
        self._peer = peer
        self._loop = asyncio.get_running_loop()
        self._inbox: deque[bytes | None] = deque()  # None: end of file
        self._paused = False
        self._scheduled = False
        self._closing = False
        self._lost = False

    # Data from the MTA, delivered one chunk per loop iteration as a socket would.
    def deliver(self, data: bytes | None) -> None:
        if self._closing:
            return
        self._inbox.append(data)
        self._schedule()

    def _schedule(self) -> None:
        if not self._scheduled and not self._paused and self._inbox:
            self._scheduled = True
            self._loop.call_soon(self._feed)

    def _feed(self) -> None:
        self._scheduled = False
        if self._paused or self._closing or not self._inbox:
            return
        data = self._inbox.popleft()
        protocol = self._protocol
        if data is None:
            if not protocol.eof_received():
                self.close()
        elif isinstance(protocol, asyncio.BufferedProtocol):
            view = memoryview(data)  # as asyncio does: into the protocol's own buffer
            while view and not self._closing:
                buffer = memoryview(protocol.get_buffer(len(view)))
                count = min(len(buffer), len(view))
                buffer[:count] = view[:count]
                protocol.buffer_updated(count)
                view = view[count:]
        else:
            protocol.data_received(data)
        self._schedule()

    def pause_reading(self) -> None:
        self._paused = True

    def resume_reading(self) -> None:
        self._paused = False
        self._schedule()

    def is_reading(self) -> bool:
        return not self._paused

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing:
            return
        if data:
            self._peer.feed_data(bytes(data))

    def can_write_eof(self) -> bool:
        return False

    def is_closing(self) -> bool:
        return self._closing

    def get_write_buffer_size(self) -> int:
        return 0

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        assert isinstance(protocol, asyncio.Protocol | asyncio.BufferedProtocol)
        self._protocol = protocol

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._inbox.clear()
        self._peer.feed_eof()
        self._loop.call_soon(self._lose)

    def abort(self) -> None:
        self.close()

    def _lose(self) -> None:
        if not self._lost:
            self._lost = True
            self._protocol.connection_lost(None)


class _StreamEnd(asyncio.Transport):
    """The MTA's end: writes are delivered to the milter's protocol."""

    def __init__(self, other: _ProtocolEnd, extra: dict[str, Any]) -> None:
        super().__init__(extra)
        self._other = other
        self._closing = False
        self._protocol: asyncio.BaseProtocol | None = None

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        assert self._protocol is not None
        return self._protocol

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing or self._other.is_closing():
            raise ConnectionResetError("write to a closed in-memory connection")
        if data:
            self._other.deliver(bytes(data))

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self._other.deliver(None)

    def is_closing(self) -> bool:
        return self._closing

    def get_write_buffer_size(self) -> int:
        return 0

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._other.deliver(None)
        protocol = self._protocol
        if protocol is not None:
            asyncio.get_running_loop().call_soon(protocol.connection_lost, None)

    def abort(self) -> None:
        self.close()


def connect_protocol(
    protocol: asyncio.Protocol | asyncio.BufferedProtocol, mta: str = "mta", milter: str = "milter"
) -> StreamPair:
    """Connect ``protocol`` (the milter's end) in memory; return the MTA's ``(reader, writer)``.

    Call inside a running event loop. ``mta`` and ``milter`` name the ends, as
    ``get_extra_info("peername")`` and ``"sockname"`` report them.
    """
    loop = asyncio.get_running_loop()
    to_mta = asyncio.StreamReader()
    milter_end = _ProtocolEnd(protocol, to_mta, {"peername": mta, "sockname": milter})
    mta_end = _StreamEnd(milter_end, {"peername": milter, "sockname": mta})
    stream_protocol = asyncio.StreamReaderProtocol(to_mta)
    mta_end.set_protocol(stream_protocol)
    stream_protocol.connection_made(mta_end)
    writer = asyncio.StreamWriter(mta_end, stream_protocol, to_mta, loop)
    protocol.connection_made(milter_end)
    return to_mta, writer
