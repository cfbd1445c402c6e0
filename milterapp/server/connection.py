"""One MTA connection served: bytes in, events to the responder, replies out, and its end.

:class:`Connection` is an :class:`asyncio.BufferedProtocol` driving a sans-IO
:class:`~milterapp.protocol.machine.MilterConnection`: the transport reads into a buffer that
the server shares between its connections, and packets are copied out of it once. The server
makes one per accepted connection; the testing kit connects one to an in-memory transport, so
tests exercise exactly the code that serves real MTAs.

Plain-function handlers run inside ``data_received``: the reply is written before the
callback returns, without a task, a future or a coroutine. The first handler that needs
awaiting moves the rest of the work to a task, and the next events wait until it is done (the
MTA waits for our reply anyway, so reading goes on, and pauses only if a flood of commands that
need no reply piles up). See docs/architecture.md for why. What to answer is the
:class:`~milterapp.server.responder.Responder`'s business; this module owns the transport,
the deadlines and how a connection ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Coroutine
from importlib.machinery import EXTENSION_SUFFIXES
from typing import Any, Final, cast

from milterapp.constants import ConnectionState
from milterapp.errors import LimitExceededError, ProtocolError
from milterapp.events import ConnectionClosed, Event, Quit, QuitNoClose
from milterapp.protocol.machine import MilterConnection
from milterapp.protocol.negotiation import Requirements
from milterapp.replies import NegotiationReply
from milterapp.server.deadlines import Deadlines
from milterapp.server.limits import Limits
from milterapp.server.metrics import Metrics
from milterapp.server.outcomes import log_event, stage_name
from milterapp.server.responder import Responder, Response
from milterapp.server.servable import Servable
from milterapp.server.writes import WriteBatch

__all__ = ["COMPILED", "Connection", "peer_name"]

#: True when this module (and with it every module of the per-packet path) was compiled with
#: mypyc (docs/performance.md, "The compiled build").
COMPILED: Final = __file__.endswith(tuple(EXTENSION_SUFFIXES))
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


def peer_name(transport: asyncio.BaseTransport) -> str:
    """The MTA's address for logs: ``host:port``, ``[v6]:port``, or the unix socket."""
    name = transport.get_extra_info("peername")
    if isinstance(name, tuple) and len(name) >= 2:
        host = f"[{name[0]}]" if ":" in str(name[0]) else str(name[0])
        return f"{host}:{name[1]}"
    local = transport.get_extra_info("sockname")
    return str(name or local or "unknown")


class Connection(asyncio.Protocol, asyncio.BufferedProtocol):
    """Serves one MTA connection with an app.

    How it reads depends on the loop. asyncio's loop sees a buffered protocol and reads into
    the buffer the server shares (its plain reads would allocate 256 KiB each). uvloop sees a
    plain protocol (it checks for :class:`asyncio.Protocol` first) and hands over each read as
    ``bytes``, one call instead of two, which saves about 5 % of the instructions of a
    message; the first packet too large for one read switches that connection to buffered
    reads (:class:`_BufferedReads`), so that a large body is read straight into its packet.

    At about 500 lines, the largest class of the server, on purpose: it is its heart, and
    its parts (reading, running the responder's work, writing, ending) share every piece of
    state; split, each half declared the other's attributes again.

    Args:
        app: what is served (an App).
        requirements: what to negotiate (``app.requirements()``).
        conn_id: the connection's id in logs and ``ctx.conn_id``.
        limits: deadlines and per-message limits (default: :class:`Limits`'s defaults).
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
        metrics: where to count what happens (``--metrics``), if anywhere.

    Attributes:
        idle: True while waiting for the MTA with no message in flight.
        closed: the current session's close handlers ran.
        error: the exception that ended the connection abnormally, if any.
        done: resolved once the connection is closed and its close handlers ran.
    """

    def __init__(
        self,
        app: Servable,
        requirements: Requirements,
        *,
        conn_id: str = "1",
        limits: Limits | None = None,
        max_data_size: int | None = None,
        admit: Callable[[Connection], bool] | None = None,
        raise_errors: bool = False,
        negotiations: dict[tuple[int, int, int], NegotiationReply] | None = None,
        log: Any = None,
        read_buffer: bytearray | None = None,
        writes: WriteBatch | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.limits = limits = limits or Limits()
        self.machine = MilterConnection(
            max_data_size=max_data_size,
            macro_events=False,
            max_macros_per_packet=limits.max_macros_per_packet,
            undecoded=requirements.undecoded_commands,
        )
        self.responder = Responder(
            app,
            requirements,
            self.machine,
            limits,
            conn_id=conn_id,
            write_now=self._write_now,
            raise_errors=raise_errors,
            log=log,
            negotiations=negotiations,
            metrics=metrics,
        )
        self.metrics = metrics
        self._read_view = memoryview(read_buffer) if read_buffer is not None else None
        self.idle = True
        self.error: BaseException | None = None
        self.transport: asyncio.Transport | None = None
        self._loop = asyncio.get_running_loop()
        self._time = self._loop.time
        self._writes = writes or WriteBatch(self._loop)
        self.done: asyncio.Future[None] = self._loop.create_future()
        self._admit = admit
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
        # uvloop's plain reads, until a large packet asks for buffered ones (see the class).
        self._plain_reads = False
        # Whether each command is timed, where its time goes for the metrics, and the event
        # whose reply a task makes (answered when the task ends).
        self._clocked = (
            metrics is not None or self.responder.log_messages or self.responder.log_events
        )
        self._durations = metrics.durations if metrics is not None else None
        self._awaited: Event | None = None

    @property
    def closed(self) -> bool:
        return self.responder.closed

    # --- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports have the methods of asyncio.Transport but not its class.
        self.transport = cast(asyncio.Transport, transport)
        self._plain_reads = _reads_plainly(transport)
        if self._admit is not None and not self._admit(self):
            self._ending = self._ended = True
            self.transport.close()
            return
        if self.metrics is not None:
            self.metrics.connection_opened()
        limits = self.limits
        self._deadlines = Deadlines(
            self._loop,
            limits.timeout,
            limits.read_timeout,
            limits.write_timeout,
            busy=lambda: self._task is not None,
            on_idle=self._idle_expired,
            on_read=self._read_expired,
            on_write=self._write_expired,
        )
        self._run(self.responder.open_session(peer_name(transport)))

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
            # (The machine makes a large packet's buffer as it meets the packet, in _process.)
            if self._plain_reads and self.machine.partial and self.machine.read_target():
                self._read_buffered()
        elif not self._reading_paused and self.machine.buffered > _BUFFER_LIMIT:
            # A handler runs and the MTA keeps sending (commands that need no reply): hold
            # further reads until the handler is done, so memory stays bounded.
            self._reading_paused = True
            assert self.transport is not None
            self.transport.pause_reading()

    def _read_buffered(self) -> None:
        """From now on, read into buffers: a large packet has begun (uvloop only)."""
        self._plain_reads = False
        if self.transport is not None:
            self.transport.set_protocol(_BufferedReads(self))

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
        """Hand every available event to the responder; write the replies in one batch."""
        machine = self.machine
        responder = self.responder
        # Each command's time, from its arrival in this batch to its reply: one clock read
        # per command (and one per batch), for the metrics, the message line and the debug
        # line alike.
        clocked = self._clocked
        if clocked:
            clock = time.perf_counter
            durations = self._durations
            log_events = responder.log_events
            responder.clock = clock()
        out = self._out
        try:
            while (event := machine.next_event()) is not None:
                if event.__class__ in _ENDINGS:
                    self._run(self._quit(event))  # type: ignore[arg-type]
                else:
                    response = responder.respond(event)
                    if response.__class__ is bytes:
                        if response:
                            out.append(response)
                        if clocked:
                            now = clock()
                            seconds = now - responder.clock
                            responder.clock = now
                            responder.spent += seconds
                            if durations is not None:
                                durations[event.__class__].append(seconds)
                            if log_events:
                                self._log_event(event, response, seconds)
                    else:
                        if clocked:
                            self._awaited = event  # measured when its task ends
                        self._start(response)  # type: ignore[arg-type]
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

    def _answered_late(self, event: Event, replies: bytes) -> None:
        """The task answering ``event`` ended: the command's time, as ``_process`` counts it
        for the others (the clock kept the command's start meanwhile)."""
        responder = self.responder
        now = time.perf_counter()
        seconds = now - responder.clock
        responder.clock = now
        responder.spent += seconds
        if self._durations is not None:
            self._durations[event.__class__].append(seconds)
        if responder.log_events:
            self._log_event(event, replies, seconds)

    def _log_event(self, event: Event, replies: bytes, seconds: float) -> None:
        ctx = self.responder.ctx
        if ctx is not None:
            log_event(ctx, stage_name(type(event)), replies, seconds)

    def _run(self, response: Response) -> None:
        if isinstance(response, bytes):
            if response:
                self._out.append(response)
        else:
            self._start(response)

    def _start(self, response: Coroutine[Any, Any, bytes]) -> None:
        """Await ``response`` in a task; reading waits (the MTA waits for our reply anyway)."""
        self._flush()
        self.idle = False
        # Reading goes on: the MTA waits for our reply before it sends a command that needs
        # one, and data_received pauses it if commands that need none pile up.
        task = self._loop.create_task(response)
        self._task = task
        task.add_done_callback(self._response_done)

    def _response_done(self, task: asyncio.Task[bytes]) -> None:
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
            if self._awaited is not None:
                event = self._awaited
                self._awaited = None
                self._answered_late(event, out)
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

    async def _write_now(self, data: bytes) -> None:
        """Write ``data`` with what is waiting, and return once the transport takes more."""
        self._out.append(data)
        self._flush()
        waiter = self._write_paused
        if waiter is not None and not waiter.done():
            await waiter
        if self._lost:
            raise ConnectionResetError("the MTA closed the connection")

    def _wake_writers(self) -> None:
        waiter, self._write_paused = self._write_paused, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _log(self) -> Any:
        ctx = self.responder.ctx
        assert ctx is not None
        return ctx.log

    # --- ending ------------------------------------------------------------------------

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

    def _quit(self, event: Quit | QuitNoClose | ConnectionClosed) -> Response:
        """Run the close handlers, then close, or open the next session (QuitNoClose); at
        once unless a handler must be awaited (every connection ends here)."""
        closing = self.responder.close_session(event)
        if not isinstance(closing, bytes):
            return self._quit_later(event, closing)
        return self._after_quit(event)

    async def _quit_later(
        self, event: Quit | QuitNoClose | ConnectionClosed, closing: Coroutine[Any, Any, bytes]
    ) -> bytes:
        await closing
        return await self._await(self._after_quit(event))

    def _after_quit(self, event: Quit | QuitNoClose | ConnectionClosed) -> Response:
        if isinstance(event, QuitNoClose):  # the same socket carries a new SMTP session
            assert self.transport is not None
            return self.responder.open_session(peer_name(self.transport))
        self._end()
        return b""

    async def _await(self, response: Response) -> bytes:
        if isinstance(response, bytes):
            return response
        return await response

    def _fail(self, exc: Exception) -> None:
        """End the connection after an error: the MTA may get TempFail, the server goes on."""
        if isinstance(exc, LimitExceededError):
            self._log().warning("limit_exceeded", limit=exc.limit, value=exc.value, count=exc.count)
            if self.metrics is not None:
                self.metrics.limit_exceeded(exc.limit or "unknown")
        if isinstance(exc, ProtocolError):
            if self.metrics is not None:
                self.metrics.protocol_error()
            self._log().warning("protocol_error", error=str(exc))
            self.error = exc
        elif isinstance(exc, ConnectionError | TimeoutError):
            self._log().info("connection_lost", error=repr(exc))
        elif getattr(exc, "milterapp_handler", None) is not None:
            # A handler's own failure let through for a test (raise_errors), logged as
            # handler_failed already: this connection ends, fail-closed.
            self._tempfail_pending()
            self.error = exc
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
        if self.responder.closed:
            self._closed()
            return
        response = self.responder.close_session(ConnectionClosed())
        if isinstance(response, bytes):
            self._closed()
        else:
            self._loop.create_task(self._close_then(response))

    async def _close_then(self, response: Coroutine[Any, Any, bytes]) -> None:
        with contextlib.suppress(Exception):
            await response
        self._closed()

    def _closed(self) -> None:
        self._ended = True
        if self.metrics is not None and self.transport is not None:
            self.metrics.connection_closed()
        self._cancel_timers()
        self.responder.release()
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
        self.responder.detach()

    def _tempfail_pending(self) -> None:
        """Answer a command still waiting with TempFail before the connection closes."""
        self._run(self.responder.tempfail_pending())
        self._flush()

    # --- deadlines ----------------------------------------------------------------------

    def _idle_expired(self) -> None:
        self._log().info("idle_timeout", timeout=self.limits.timeout)
        if self.metrics is not None:
            self.metrics.timeout("idle")
        self._end()

    def _read_expired(self) -> None:
        if self.metrics is not None:
            self.metrics.timeout("read")
        self._log().warning(
            "read_timeout", timeout=self.limits.read_timeout, buffered=self.machine.buffered
        )
        self._end()

    def _write_expired(self) -> None:
        self._log().warning("write_timeout", timeout=self.limits.write_timeout)
        if self.metrics is not None:
            self.metrics.timeout("write")
        if self.transport is not None:
            self.transport.abort()  # close() would wait for the unread replies to be sent

    def _cancel_timers(self) -> None:
        if self._deadlines is not None:
            self._deadlines.cancel()


class _BufferedReads(asyncio.BufferedProtocol):
    """What a uvloop transport reads for once a connection has switched to buffered reads:
    the same connection (uvloop decides how to read by the protocol's class)."""

    def __init__(self, connection: Connection) -> None:
        self._connection = connection

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._connection.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        self._connection.buffer_updated(nbytes)

    def eof_received(self) -> bool:
        return self._connection.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._connection.connection_lost(exc)

    def pause_writing(self) -> None:
        self._connection.pause_writing()

    def resume_writing(self) -> None:
        self._connection.resume_writing()


def _reads_plainly(transport: asyncio.BaseTransport) -> bool:
    """Whether ``transport`` reads plainly for a :class:`Connection`: uvloop's stream
    transports do (told apart by name, so that uvloop is never imported for this)."""
    kind = type(transport)
    return kind.__module__ == "uvloop.loop" and kind.__name__ in _UVLOOP_STREAMS


#: uvloop's transports that choose how to read by the protocol's class.
_UVLOOP_STREAMS: Final = frozenset({"TCPTransport", "UnixTransport"})
