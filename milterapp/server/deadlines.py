"""The deadlines of one connection: idle, per command, and for our replies to be read.

Timers, not reads with time-outs: the idle deadline is one timer per period, re-armed only
when it fires (a read only records the time); the per-command read deadline runs only while a
command is incomplete; the write deadline only while the transport's buffer is full. A
connection that behaves costs no timer operation per packet.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

__all__ = ["Deadlines"]


class Deadlines:
    """Calls ``on_idle``, ``on_read`` or ``on_write`` when that deadline passes.

    Args:
        timeout: seconds the MTA may stay silent between commands (the idle deadline).
        read_timeout: seconds a command may take to arrive whole once begun.
        write_timeout: seconds our replies may wait unread.
        busy: whether our own handlers are running: the idle deadline is about the MTA's
            silence, so it waits while they run.

    Each deadline is off when 0.
    """

    __slots__ = (
        "_busy",
        "_idle",
        "_loop",
        "_on_idle",
        "_on_read",
        "_on_write",
        "_read",
        "_read_timeout",
        "_timeout",
        "_write",
        "_write_timeout",
        "last_read",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        timeout: float,
        read_timeout: float,
        write_timeout: float,
        *,
        busy: Callable[[], bool],
        on_idle: Callable[[], None],
        on_read: Callable[[], None],
        on_write: Callable[[], None],
    ) -> None:
        self._loop = loop
        self._timeout = timeout
        self._read_timeout = read_timeout
        self._write_timeout = write_timeout
        self._busy = busy
        self._on_idle = on_idle
        self._on_read = on_read
        self._on_write = on_write
        # Loop time of the MTA's last read: the connection sets it at every read (an
        # attribute rather than a call, for the per-packet path).
        self.last_read = loop.time()
        self._idle: asyncio.TimerHandle | None = None
        self._read: asyncio.TimerHandle | None = None
        self._write: asyncio.TimerHandle | None = None
        if timeout:
            self._idle = loop.call_later(timeout, self._idle_check)

    def command_incomplete(self, incomplete: bool) -> None:
        """Whether a command has begun and is not whole yet (after each batch of reads)."""
        if incomplete and self._read_timeout:
            if self._read is None:  # armed at the first byte of the command
                self._read = self._loop.call_later(self._read_timeout, self._read_expired)
        elif self._read is not None:
            self._read.cancel()
            self._read = None

    def writing_paused(self) -> None:
        if self._write_timeout and self._write is None:
            self._write = self._loop.call_later(self._write_timeout, self._write_expired)

    def writing_resumed(self) -> None:
        if self._write is not None:
            self._write.cancel()
            self._write = None

    def cancel(self) -> None:
        for timer in (self._idle, self._read, self._write):
            if timer is not None:
                timer.cancel()
        self._idle = self._read = self._write = None

    def _idle_check(self) -> None:
        timeout = self._timeout
        left = self.last_read + timeout - self._loop.time()
        if left > 0 or self._busy():
            self._idle = self._loop.call_later(left if left > 0 else timeout, self._idle_check)
            return
        self._idle = None
        self._on_idle()

    def _read_expired(self) -> None:
        self._read = None
        self._on_read()

    def _write_expired(self) -> None:
        self._write = None
        self._on_write()
