"""How replies go out: written together at the end of the event loop's turn (each one is
sent at once: the acceptor disables Nagle's algorithm)."""

from __future__ import annotations

import asyncio

__all__ = ["WriteBatch"]


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
