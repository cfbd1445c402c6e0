"""How replies go out: written together at the end of the event loop's turn, and each one
sent at once rather than held back by Nagle's algorithm."""

from __future__ import annotations

import asyncio
import contextlib
import socket

__all__ = ["WriteBatch", "no_delay"]


class WriteBatch:
    """Replies written together, once the event loop has run every callback that is ready.

    Each reply wakes the MTA's process if it sleeps; written one by one between the other
    connections' work, a reply wakes it each time. Written in one burst, a few wake it once
    (docs/performance.md has what that is worth). The delay is one turn of the loop; each
    connection's bytes keep their order.
    """

    __slots__ = ("_loop", "_pending")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._pending: list[tuple[asyncio.WriteTransport, bytes]] = []

    def add(self, transport: asyncio.WriteTransport, data: bytes) -> None:
        """Write ``data`` to ``transport`` at the end of this turn of the loop."""
        if not self._pending:
            self._loop.call_soon(self.flush)
        self._pending.append((transport, data))

    def flush(self) -> None:
        """Write everything waiting now."""
        pending, self._pending = self._pending, []
        for transport, data in pending:
            if not transport.is_closing():
                try:
                    transport.write(data)
                except (OSError, RuntimeError):  # that connection is broken; the others go on
                    transport.abort()


def no_delay(transport: asyncio.BaseTransport) -> None:
    """Send each reply at once: Nagle's algorithm would hold a small reply back until the
    MTA acknowledges the previous one, which its delayed ACKs make take ~40 ms."""
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
