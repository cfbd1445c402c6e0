"""An in-memory, full-duplex asyncio stream pair: a socket without the socket.

What one side writes, the other side reads, through real :class:`asyncio.StreamReader` and
:class:`asyncio.StreamWriter` objects, so code written for the network (the server's
connection handler) runs unchanged in tests.
"""

from __future__ import annotations

import asyncio
from typing import Any

__all__ = ["StreamPair", "memory_pipe"]

StreamPair = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class _MemoryTransport(asyncio.Transport):
    """Delivers writes straight into the peer's reader; closing sends it end of file."""

    def __init__(self, peer: asyncio.StreamReader, extra: dict[str, Any]) -> None:
        super().__init__(extra)
        self._peer = peer
        self._loop = asyncio.get_running_loop()
        self._closing = False
        self._protocol: asyncio.BaseProtocol | None = None

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        assert self._protocol is not None
        return self._protocol

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing or self._peer.at_eof():
            raise ConnectionResetError("write to a closed in-memory stream")
        if data:
            self._peer.feed_data(bytes(data))

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self._peer.feed_eof()

    def is_closing(self) -> bool:
        return self._closing

    def get_write_buffer_size(self) -> int:
        return 0

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._peer.feed_eof()
        if self._protocol is not None and not self._loop.is_closed():
            self._loop.call_soon(self._protocol.connection_lost, None)

    def abort(self) -> None:
        self.close()


def _side(
    inbound: asyncio.StreamReader, outbound: asyncio.StreamReader, name: str, peer: str
) -> StreamPair:
    loop = asyncio.get_running_loop()
    transport = _MemoryTransport(outbound, {"peername": peer, "sockname": name})
    protocol = asyncio.StreamReaderProtocol(inbound)
    transport.set_protocol(protocol)
    protocol.connection_made(transport)
    return inbound, asyncio.StreamWriter(transport, protocol, inbound, loop)


def memory_pipe(first: str = "mta", second: str = "milter") -> tuple[StreamPair, StreamPair]:
    """Return two connected ``(reader, writer)`` pairs; call inside a running event loop.

    ``first`` and ``second`` name the ends (``get_extra_info("peername")`` on one side gives
    the other's name).
    """
    to_first, to_second = asyncio.StreamReader(), asyncio.StreamReader()
    return (
        _side(to_first, to_second, first, second),
        _side(to_second, to_first, second, first),
    )
