"""How a connection ends: quit, shutdown, errors and deadlines.

:class:`Endings` is a mixin of :class:`~milterapp.session.ConnectionHandler`, which owns the
state: that class serves the reads and writes of a connection, this one closes it, always
running the session's close handlers first and answering a command still waiting with
TempFail when the connection ends abnormally (fail closed).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from milterapp.errors import LimitExceededError, ProtocolError
from milterapp.events import ConnectionClosed, Quit, QuitNoClose
from milterapp.replies import TempFail
from milterapp.steps import Step

if TYPE_CHECKING:
    from milterapp.context import Context
    from milterapp.deadlines import Deadlines
    from milterapp.limits import Limits
    from milterapp.protocol.machine import MilterConnection
    from milterapp.steps import Steps
    from milterapp.transports import WriteBatch

__all__ = ["Endings"]


class Endings:
    """Ending a connection (see the module docstring)."""

    # The connection's state, set up by ConnectionHandler.__init__.
    idle: bool
    error: BaseException | None
    ctx: Context | None
    transport: asyncio.Transport | None
    machine: MilterConnection
    steps: Steps
    limits: Limits
    done: asyncio.Future[None]
    _loop: asyncio.AbstractEventLoop
    _task: asyncio.Task[bytes] | None
    _out: list[bytes]
    _writes: WriteBatch
    _deadlines: Deadlines | None
    _stopping: bool
    _ending: bool
    _ended: bool
    _lost: bool
    _cancelled_by: str | None

    if TYPE_CHECKING:  # ConnectionHandler's

        def _log(self) -> Any: ...

        def _flush(self) -> None: ...

        def _new_context(self, peer: str) -> Context: ...

    def stop(self) -> None:
        """The server is shutting down: close now if idle, else once the message is done."""
        self._stopping = True
        if self.idle and self._task is None and not self._ending:
            self._log().info("closing_for_shutdown")
            self._end()

    def abort(self) -> None:
        """Shutdown ran out of grace: answer what waits with TempFail, and close."""
        if self._ending:
            return
        if self._task is not None:
            self._cancel_task("shutdown")
            return
        self._tempfail_pending()
        self._log().info("connection_cancelled")
        self._end()

    def _cancel_task(self, reason: str) -> None:
        self._cancelled_by = reason
        # On the next turn of the loop: a task cancelled before its first step would leave
        # the coroutines it was given never started.
        task = self._task
        if task is not None:
            self._loop.call_soon(task.cancel)

    def _quit(self, event: Quit | QuitNoClose | ConnectionClosed) -> Step:
        """Run the close handlers, then close, or open the next session (QuitNoClose); at
        once unless a handler must be awaited (every connection ends here)."""
        closing = self.steps.close_session(event)
        if not isinstance(closing, bytes):
            return self._quit_later(event, closing)
        return self._after_quit(event)

    async def _quit_later(
        self, event: Quit | QuitNoClose | ConnectionClosed, closing: Coroutine[Any, Any, bytes]
    ) -> bytes:
        await closing
        return await self._await(self._after_quit(event))

    def _after_quit(self, event: Quit | QuitNoClose | ConnectionClosed) -> Step:
        if isinstance(event, QuitNoClose):  # the same socket carries a new SMTP session
            assert self.ctx is not None
            return self.steps.open_session(self._new_context(self.ctx.peer))
        self._end()
        return b""

    async def _await(self, step: Step) -> bytes:
        if isinstance(step, bytes):
            return step
        return await step

    def _fail(self, exc: Exception) -> None:
        """End the connection after an error: the MTA may get TempFail, the server goes on."""
        if isinstance(exc, LimitExceededError):
            self._log().warning("limit_exceeded", limit=exc.limit, value=exc.value, count=exc.count)
        if isinstance(exc, ProtocolError):
            self._log().warning("protocol_error", error=str(exc))
            self.error = exc
        elif isinstance(exc, ConnectionError | TimeoutError):
            self._log().info("connection_lost", error=repr(exc))
        else:
            # A bug of ours (or raise_errors in tests): this connection ends, fail-closed.
            self._log().error("connection_failed", exc_info=exc)
            self._tempfail_pending()
            self.error = exc
        self._end()

    def _end(self) -> None:
        """Close the connection, running the close handlers first if they have not run."""
        if self._ending:
            return
        self._ending = True
        self.idle = True
        if self.steps.closed:
            self._closed()
            return
        step = self.steps.close_session(ConnectionClosed())
        if isinstance(step, bytes):
            self._closed()
        else:
            self._loop.create_task(self._close_then(step))

    async def _close_then(self, step: Coroutine[Any, Any, bytes]) -> None:
        with contextlib.suppress(Exception):
            await step
        self._closed()

    def _closed(self) -> None:
        self._ended = True
        self._cancel_timers()
        if self.ctx is not None:
            self.ctx.message.close()
        self._flush()
        self._writes.flush()  # what we owe goes out before the close
        if self.transport is not None:
            self.transport.close()
        self._maybe_done()

    def _maybe_done(self) -> None:
        if self._lost and self._ended and self._task is None and not self.done.done():
            self._unlink()
            self.done.set_result(None)

    def _unlink(self) -> None:
        """Drop the references that point back at this connection (timers' callbacks, the
        progress callback), so that its objects are freed as soon as the server lets it go
        instead of waiting for the cycle collector (some 40 objects per connection)."""
        self._deadlines = None
        self.steps.progress = None
        if self.ctx is not None:
            self.ctx.detach()

    def _tempfail_pending(self) -> None:
        """Answer a command still waiting with TempFail before the connection closes."""
        machine = self.machine
        if machine.awaiting_reply and machine.pending_command != "O":
            with contextlib.suppress(Exception):
                self._out.append(machine.send(TempFail()))
        self._flush()

    # --- deadlines ----------------------------------------------------------------------

    def _idle_expired(self) -> None:
        self._log().info("idle_timeout", timeout=self.limits.timeout)
        self._end()

    def _read_expired(self) -> None:
        self._log().warning(
            "read_timeout", timeout=self.limits.read_timeout, buffered=self.machine.buffered
        )
        self._end()

    def _write_expired(self) -> None:
        self._log().warning("write_timeout", timeout=self.limits.write_timeout)
        if self.transport is not None:
            self.transport.abort()  # close() would wait for the unread replies to be sent

    def _cancel_timers(self) -> None:
        if self._deadlines is not None:
            self._deadlines.cancel()
