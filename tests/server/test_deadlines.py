"""Deadlines driven by a fake clock: which timers run, when, and what they call."""

from __future__ import annotations

from collections.abc import Callable

from milterapp.server.deadlines import Deadlines
from milterapp.server.limits import Limits


class Timer:
    def __init__(self, when: float, callback: Callable[[], None]) -> None:
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class FakeLoop:
    """time() and call_later() only; the test moves the clock and fires timers."""

    def __init__(self) -> None:
        self.now = 0.0
        self.timers: list[Timer] = []

    def time(self) -> float:
        return self.now

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        timer = Timer(self.now + delay, callback)
        self.timers.append(timer)
        return timer

    def pending(self) -> list[Timer]:
        return [timer for timer in self.timers if not timer.cancelled]

    def advance(self, to: float) -> None:
        """Move the clock to ``to``, firing due timers in order."""
        while due := sorted(
            (t for t in self.pending() if t.when <= to), key=lambda timer: timer.when
        ):
            timer = due[0]
            self.now = timer.when
            timer.cancelled = True  # fired
            timer.callback()
        self.now = to


def deadlines(loop: FakeLoop, busy: list[bool], fired: list[str], **given: float) -> Deadlines:
    """Deadlines with the server's defaults, but for those ``given`` (0 turns one off)."""
    defaults = Limits()
    return Deadlines(
        loop,  # type: ignore[arg-type]
        given.get("timeout", defaults.timeout),
        given.get("read_timeout", defaults.read_timeout),
        given.get("write_timeout", defaults.write_timeout),
        busy=lambda: busy[0],
        on_idle=lambda: fired.append(f"idle@{loop.now:g}"),
        on_read=lambda: fired.append(f"read@{loop.now:g}"),
        on_write=lambda: fired.append(f"write@{loop.now:g}"),
    )


def test_idle_fires_a_full_timeout_after_the_last_read_not_later() -> None:
    loop, fired = FakeLoop(), []
    watch = deadlines(loop, [False], fired, timeout=10)
    loop.advance(5)
    watch.last_read = loop.time()  # a read, as the connection records it
    loop.advance(30)
    assert fired == ["idle@15"]


def test_idle_waits_while_our_handlers_run() -> None:
    loop, fired, busy = FakeLoop(), [], [True]
    deadlines(loop, busy, fired, timeout=10)
    loop.advance(25)
    assert fired == []
    busy[0] = False
    loop.advance(40)
    assert fired == ["idle@30"]


def test_read_deadline_runs_only_while_a_command_is_incomplete() -> None:
    loop, fired = FakeLoop(), []
    watch = deadlines(loop, [False], fired, timeout=0, read_timeout=4)
    watch.command_incomplete(True)
    loop.advance(3)
    watch.command_incomplete(True)  # more bytes of the same command: not re-armed
    watch.command_incomplete(False)  # whole now
    watch.command_incomplete(True)  # the next command begins at 3
    loop.advance(10)
    assert fired == ["read@7"]
    assert loop.pending() == []


def test_write_deadline_runs_only_while_writing_is_paused() -> None:
    loop, fired = FakeLoop(), []
    watch = deadlines(loop, [False], fired, timeout=0, write_timeout=2)
    watch.writing_paused()
    loop.advance(1)
    watch.writing_resumed()
    loop.advance(5)
    assert fired == []
    watch.writing_paused()
    loop.advance(10)
    assert fired == ["write@7"]


def test_zero_turns_a_deadline_off_and_cancel_stops_all() -> None:
    loop, fired = FakeLoop(), []
    watch = deadlines(loop, [False], fired, timeout=0, read_timeout=0, write_timeout=0)
    watch.command_incomplete(True)
    watch.writing_paused()
    assert loop.pending() == []
    watch = deadlines(loop, [False], fired, timeout=5, read_timeout=5, write_timeout=5)
    watch.command_incomplete(True)
    watch.writing_paused()
    watch.cancel()
    loop.advance(100)
    assert fired == []
