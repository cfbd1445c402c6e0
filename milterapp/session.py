"""One MTA connection run through an App: bytes in, handlers, replies out.

:class:`ConnectionHandler` is an :class:`asyncio.BufferedProtocol` driving a sans-IO
:class:`MilterConnection`: the transport reads into a buffer that the server shares between
its connections, and packets are copied out of it once. The server makes one per accepted
connection; the testing kit connects one to an in-memory transport, so tests exercise exactly
the code that serves real MTAs.

Plain-function handlers run inside ``data_received``: the reply is written before the
callback returns, without a task, a future or a coroutine. The first handler that needs
awaiting moves the rest of the work to a task, and the next events wait until it is done (the
MTA waits for our reply anyway, so reading goes on, and pauses only if a flood of commands that
need no reply piles up). See docs/architecture.md for why. How a connection ends (quit,
shutdown, errors, deadlines) is :class:`~milterapp.endings.Endings`, a mixin of this class.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, Final, cast

from milterapp.app import App
from milterapp.context import Context
from milterapp.deadlines import Deadlines
from milterapp.endings import Endings
from milterapp.errors import ProtocolError
from milterapp.events import ConnectionClosed, Quit, QuitNoClose
from milterapp.limits import Limits
from milterapp.protocol.machine import ConnectionState, MilterConnection
from milterapp.protocol.negotiation import Requirements
from milterapp.replies import NegotiationReply, Progress
from milterapp.steps import Step, Steps
from milterapp.transports import WriteBatch, no_delay, peer_name

__all__ = ["ConnectionHandler"]

#: Bytes the MTA may send ahead while a handler runs before reading pauses: a packet of the
#: largest size we accept, and more.
_BUFFER_LIMIT: Final = 2 * 1024 * 1024
#: Reads up to this size are copied out of the read buffer at once; larger ones are lent to
#: the machine, which copies each packet out of them once.
_COPY_READS_UP_TO: Final = 2048
#: Size of the read buffer of a connection that was given none (the server shares one).
_OWN_READ_BUFFER: Final = 64 * 1024
#: Events that end an SMTP session on this connection.
_ENDINGS: Final = frozenset({Quit, QuitNoClose, ConnectionClosed})
_MESSAGE: Final = ConnectionState.MESSAGE


class ConnectionHandler(Endings, asyncio.BufferedProtocol):
    """Serves one MTA connection with an App.

    Args:
        app: the App whose handlers run.
        requirements: what to negotiate (``app.requirements()``).
        conn_id: the connection's id in logs and ``ctx.conn_id``.
        limits: deadlines and per-message limits (:class:`~milterapp.limits.Limits`).
        max_data_size: largest packet payload accepted (None: the negotiated size).
        admit: called when the connection is made; False closes it at once, before
            negotiation (the server's connection limit).
        raise_errors: let handler exceptions escape instead of answering with the fallback
            (tests); the first one is kept in :attr:`error`.
        negotiations: negotiation replies by offer, shared by one server's connections.
        log: the structlog logger that each session's ``ctx.log`` binds to (default:
            ``structlog.get_logger("milterapp")``).
        read_buffer: where the transport reads into; one buffer may serve every connection
            of an event loop, since each read is consumed (or copied) before the next.
        writes: where replies wait for the end of the event loop's turn; one
            :class:`WriteBatch` may serve every connection of an event loop.

    Attributes:
        idle: True while waiting for the MTA with no message in flight.
        closed: the current session's close handlers ran.
        error: the exception that ended the connection abnormally, if any.
        done: resolved once the connection is closed and its close handlers ran.
    """

    def __init__(
        self,
        app: App,
        requirements: Requirements,
        *,
        conn_id: str = "1",
        limits: Limits | None = None,
        max_data_size: int | None = None,
        admit: Callable[[ConnectionHandler], bool] | None = None,
        raise_errors: bool = False,
        negotiations: dict[tuple[int, int, int], NegotiationReply] | None = None,
        log: Any = None,
        read_buffer: bytearray | None = None,
        writes: WriteBatch | None = None,
    ) -> None:
        self.app = app
        self.conn_id = conn_id
        self.limits = limits or Limits()
        self.machine = MilterConnection(
            max_data_size=max_data_size,
            macro_events=False,
            max_macros_per_packet=self.limits.max_macros_per_packet,
        )
        self.steps = Steps(app, requirements, self.machine, self.limits, negotiations)
        self._base_log = log
        self._read_view = memoryview(read_buffer) if read_buffer is not None else None
        self.raise_errors = raise_errors
        self.idle = True
        self.error: BaseException | None = None
        self.ctx: Context | None = None
        self.transport: asyncio.Transport | None = None
        self._loop = asyncio.get_running_loop()
        self._time = self._loop.time
        self._writes = writes or WriteBatch(self._loop)
        self.done: asyncio.Future[None] = self._loop.create_future()
        self._admit = admit
        self._sessions = 0
        self._out: list[bytes] = []
        self._task: asyncio.Task[bytes] | None = None  # awaiting handlers
        self._reading_paused = False
        self._stopping = False  # the server is shutting down
        self._ending = False  # the connection is being closed; nothing more is processed
        self._ended = False  # ...and the close handlers ran
        self._lost = False  # the transport is gone
        self._cancelled_by: str | None = None
        self._write_paused: asyncio.Future[None] | None = None
        self._deadlines: Deadlines | None = None
        self._target: memoryview | None = None  # lent to the transport by get_buffer

    @property
    def closed(self) -> bool:
        return self.steps.closed

    # --- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports have the methods of asyncio.Transport but not its class.
        self.transport = cast(asyncio.Transport, transport)
        if self._admit is not None and not self._admit(self):
            self._ending = self._ended = True
            self.transport.close()
            return
        no_delay(transport)
        ctx = self._new_context(peer_name(transport))
        self._deadlines = Deadlines(
            self._loop,
            self.limits,
            busy=lambda: self._task is not None,
            on_idle=self._idle_expired,
            on_read=self._read_expired,
            on_write=self._write_expired,
        )
        self._run(self.steps.open_session(ctx))

    def get_buffer(self, sizehint: int) -> memoryview:
        if self.machine.partial:
            # The rest of a large packet that has begun is read straight into its own buffer.
            target = self._target = self.machine.read_target()
            if target is not None:
                return target
        view = self._read_view
        if view is None:
            view = self._read_view = memoryview(bytearray(_OWN_READ_BUFFER))
        return view

    def buffer_updated(self, nbytes: int) -> None:
        if self._target is not None:
            self._target = None
            self._received_into_target(nbytes)
            return
        view = self._read_view
        assert view is not None
        if nbytes <= _COPY_READS_UP_TO:
            # Commands are small: one copy now costs less than lending the buffer.
            self.data_received(bytes(view[:nbytes]))
            return
        try:
            self.data_received(view[:nbytes])
        finally:
            self.machine.release()  # the buffer is about to be reused: copy what is left

    def _received_into_target(self, nbytes: int) -> None:
        if self._deadlines is not None:
            self._deadlines.last_read = self._time()
        if self._ending:
            return
        self.machine.target_filled(nbytes)
        if self._task is None:
            self._process()

    def data_received(self, data: bytes | memoryview) -> None:
        if self._deadlines is not None:
            self._deadlines.last_read = self._time()
        if self._ending:
            return
        try:
            self.machine.receive_data(data)
        except ProtocolError as exc:
            self._fail(exc)
            return
        if self._task is None:
            self._process()
        elif not self._reading_paused and self.machine.buffered > _BUFFER_LIMIT:
            # A handler runs and the MTA keeps sending (commands that need no reply): hold
            # further reads until the handler is done, so memory stays bounded.
            self._reading_paused = True
            assert self.transport is not None
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        if not self._ending:
            self.machine.receive_data(b"")
            if self._task is None:
                self._process()
        return True  # we close the transport ourselves, once close handlers ran

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._cancel_timers()
        self._wake_writers()
        if self._task is not None and not self._ending:
            # The MTA is gone: stop running handlers for a peer that cannot hear the answer.
            self._cancel_task("connection_lost")
        elif not self._ending:
            self._log().info("connection_lost", error=repr(exc))
            self._end()
        self._maybe_done()

    def pause_writing(self) -> None:
        self._write_paused = self._loop.create_future()
        if self._deadlines is not None:
            self._deadlines.writing_paused()

    def resume_writing(self) -> None:
        if self._deadlines is not None:
            self._deadlines.writing_resumed()
        self._wake_writers()

    # --- processing ----------------------------------------------------------------------

    def _process(self) -> None:
        """Hand every available event to the steps; write the replies in one batch."""
        machine = self.machine
        steps = self.steps
        try:
            while (event := machine.next_event()) is not None:
                if event.__class__ in _ENDINGS:
                    self._run(self._quit(event))  # type: ignore[arg-type]
                else:
                    self._run(steps.on_event(event))
                if self._task is not None or self._ending:
                    break
        except Exception as exc:  # noqa: BLE001 - classified and logged by _fail
            self._fail(exc)
            return
        self._flush()
        if self._task is None and not self._ending:
            # Between batches: shutdown at an idle point, and the per-command read deadline.
            idle = self.idle = machine.state is not _MESSAGE
            if idle and self._stopping:
                self._log().info("closing_for_shutdown")
                self._end()
            elif self._deadlines is not None:
                self._deadlines.command_incomplete(machine.partial)

    def _run(self, step: Step) -> None:
        if isinstance(step, bytes):
            if step:
                self._out.append(step)
        else:
            self._start(step)

    def _start(self, step: Coroutine[Any, Any, bytes]) -> None:
        """Await ``step`` in a task; reading waits (the MTA waits for our reply anyway)."""
        self._flush()
        self.idle = False
        # Reading goes on: the MTA waits for our reply before it sends a command that needs
        # one, and data_received pauses it if commands that need none pile up.
        task = self._loop.create_task(step)
        self._task = task
        task.add_done_callback(self._step_done)

    def _step_done(self, task: asyncio.Task[bytes]) -> None:
        self._task = None
        if task.cancelled():
            if self._cancelled_by == "shutdown":
                self._tempfail_pending()
                self._log().info("connection_cancelled")
            elif not self._ending:
                self._log().info("connection_lost", error="the MTA closed the connection")
            self._end()
        elif (exc := task.exception()) is not None:
            if not self._ending:
                self._fail(exc if isinstance(exc, Exception) else RuntimeError(repr(exc)))
        else:
            out = task.result()
            if out:
                self._out.append(out)
            if self._ending:
                self._flush()
            elif self._lost:  # the MTA went away while the handler ran, which then finished
                self._log().info("connection_lost", error="the MTA closed the connection")
                self._end()
            else:
                if self._reading_paused and not self._lost:
                    self._reading_paused = False
                    assert self.transport is not None
                    self.transport.resume_reading()
                self._process()
        self._maybe_done()

    # --- writing -------------------------------------------------------------------------

    def _flush(self) -> None:
        out = self._out
        if not out:
            return
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        transport = self.transport
        if transport is not None and not self._lost:  # (a closing one is skipped at flush)
            self._writes.add(transport, data)

    async def _drain(self) -> None:
        waiter = self._write_paused
        if waiter is not None and not waiter.done():
            await waiter
        if self._lost:
            raise ConnectionResetError("the MTA closed the connection")

    def _wake_writers(self) -> None:
        waiter, self._write_paused = self._write_paused, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # --- contexts ------------------------------------------------------------------------

    def _log(self) -> Any:
        assert self.ctx is not None
        return self.ctx.log

    def _new_context(self, peer: str) -> Context:
        """Start a session: a fresh context (one per SMTP session on this connection)."""
        machine = self.machine

        async def progress() -> None:
            self._out.append(machine.send(Progress()))
            self._flush()
            await self._drain()

        config = self.app.config
        ctx = Context(
            app_name=self.app.name,
            conn_id=self.conn_id if not self._sessions else f"{self.conn_id}.{self._sessions}",
            peer=peer,
            macros=machine.macros,
            spool_threshold=config.spool_threshold if config.keep_message else None,
            progress=progress,
            log=self._base_log,
        )
        ctx.options = machine.options  # known already when a connection is reused (QUIT_NC)
        ctx.raise_errors = self.raise_errors
        self._sessions += 1
        self.ctx = ctx
        self.steps.ctx = ctx
        self.steps.progress = progress
        return ctx
