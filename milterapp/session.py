"""One MTA connection run through an App: bytes in, handlers, replies out.

:class:`ConnectionHandler` drives a sans-IO :class:`MilterConnection` over an asyncio stream
pair. The server makes one per accepted connection; the testing kit makes one per in-memory
pipe, so tests exercise exactly the code that serves real MTAs.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable
from typing import Any, Final

from milterapp.app import App, CloseEvent
from milterapp.context import Context
from milterapp.errors import (
    LocalProtocolError,
    NegotiationError,
    ProtocolError,
    RemoteProtocolError,
)
from milterapp.events import (
    Abort,
    Body,
    Connect,
    ConnectionClosed,
    ConnectionOpened,
    Data,
    EndOfHeaders,
    EndOfMessage,
    EnvFrom,
    EnvRcpt,
    Event,
    Header,
    Helo,
    Macros,
    Negotiate,
    Quit,
    QuitNoClose,
    Unknown,
)
from milterapp.protocol.constants import DEFAULT_MAX_DATA_SIZE
from milterapp.protocol.machine import ConnectionState, MilterConnection
from milterapp.protocol.negotiation import Requirements, negotiate
from milterapp.replies import (
    Accept,
    Continue,
    Progress,
    Reject,
    Shutdown,
    Skip,
    TempFail,
    Verdict,
)

__all__ = [
    "DEFAULT_MAX_HEADERS",
    "DEFAULT_MAX_HEADER_SIZE",
    "DEFAULT_MAX_MACROS_PER_PACKET",
    "DEFAULT_MAX_RECIPIENTS",
    "HEADER_TOO_LARGE",
    "TOO_MANY_HEADERS",
    "TOO_MANY_RECIPIENTS",
    "ConnectionHandler",
]

READ_SIZE: Final = 256 * 1024

#: Limits per connection and per message (0: no limit); see :class:`ConnectionHandler`.
DEFAULT_MAX_MACROS_PER_PACKET: Final = 256
DEFAULT_MAX_HEADERS: Final = 1000
DEFAULT_MAX_HEADER_SIZE: Final = 256 * 1024
DEFAULT_MAX_RECIPIENTS: Final = 1000

# The replies when a limit is hit. Temporary: the limits protect this milter's resources, the
# mail itself may be fine (and a milter fails closed: nothing passes unchecked). 452 with
# X.5.3 is the SMTP answer to one recipient too many (RFC 5321 4.5.3.1.10, RFC 3463); 452
# ("insufficient system storage") with X.3.4 ("message too big for system") says a message
# is over what the system takes, temporarily.
TOO_MANY_RECIPIENTS: Final = TempFail(code=452, xcode="4.5.3", text="too many recipients")
TOO_MANY_HEADERS: Final = TempFail(code=452, xcode="4.3.4", text="too many headers")
HEADER_TOO_LARGE: Final = TempFail(code=452, xcode="4.3.4", text="header too large")
#: Commands of a message that a refused message no longer runs handlers for.
_MESSAGE_STAGES: Final = frozenset({"envrcpt", "data", "header", "eoh", "body", "eom"})
_HANDLER_NAMES: Final[dict[type[Event], str]] = {
    Connect: "connect",
    Helo: "helo",
    EnvFrom: "envfrom",
    EnvRcpt: "envrcpt",
    Data: "data",
    Unknown: "unknown",
    Header: "header",
    EndOfHeaders: "eoh",
    Body: "body",
    EndOfMessage: "eom",
}


class ConnectionHandler:
    """Serves one MTA connection with an App.

    Args:
        app: the App whose handlers run.
        requirements: what to negotiate (``app.requirements()``).
        conn_id: the connection's id in logs and ``ctx.conn_id``.
        timeout: seconds the MTA may stay silent between commands.
        max_data_size: largest packet payload accepted (None: the negotiated size).
        max_macros_per_packet: most name/value pairs in one ``D`` packet; more is a protocol
            error that closes the connection.
        max_headers: most headers per message; the next one tempfails the message.
        max_header_size: largest header (name and value, in bytes); a larger one tempfails
            the message.
        max_recipients: most recipients per message; each one above is tempfailed alone.
            Every limit is off when 0. A message that went over a limit is answered
            TempFail at the first of its commands that expects a reply (the exceeding
            one if it does), its handlers no longer run, and the next message is served.
        stopping: tells whether the server is shutting down (the connection then ends at
            the next point where no message is in flight).
        raise_errors: let handler exceptions escape instead of answering with the fallback
            (tests); the first one is kept in :attr:`error`.

    Attributes:
        idle: True while waiting for the MTA with no message in flight.
        closed: the current session's close handlers ran.
        error: the exception that ended the connection abnormally, if any.
    """

    def __init__(
        self,
        app: App,
        requirements: Requirements,
        *,
        conn_id: str = "1",
        timeout: float = 7210.0,
        max_data_size: int | None = None,
        max_macros_per_packet: int = DEFAULT_MAX_MACROS_PER_PACKET,
        max_headers: int = DEFAULT_MAX_HEADERS,
        max_header_size: int = DEFAULT_MAX_HEADER_SIZE,
        max_recipients: int = DEFAULT_MAX_RECIPIENTS,
        stopping: Callable[[], bool] = lambda: False,
        raise_errors: bool = False,
    ) -> None:
        self.app = app
        self._requirements = requirements
        self.conn_id = conn_id
        self.timeout = timeout
        self.machine = MilterConnection(max_data_size=max_data_size)
        self.max_macros_per_packet = max_macros_per_packet
        self.max_headers = max_headers
        self.max_header_size = max_header_size
        self.max_recipients = max_recipients
        # The message that went over a limit, and the reply it gets (at most one at a time).
        self._refused: tuple[object, TempFail] | None = None
        self._stopping = stopping
        self.raise_errors = raise_errors
        self.idle = True
        self.closed = False
        self.error: BaseException | None = None
        self._sessions = 0
        self.ctx: Context | None = None

    async def run(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Serve the connection until the MTA quits or closes, or the server stops."""
        machine = self.machine
        _no_delay(writer)
        ctx = self._new_context(_peer(writer), writer)
        try:
            await self._session(reader, writer)
        except asyncio.CancelledError:
            # Shutdown ran out of grace: the MTA gets a temporary failure, not silence.
            _tempfail_pending(machine, writer)
            self._log().info("connection_cancelled")
        except ProtocolError as exc:
            self._log().warning("protocol_error", error=str(exc))
            self.error = exc
        except (ConnectionError, TimeoutError) as exc:
            self._log().info("connection_lost", error=repr(exc))
        except Exception as exc:  # noqa: BLE001 - logged below; one connection must not stop the server
            # A bug of ours: this connection ends, fail-closed; the server goes on.
            self._log().error("connection_failed", exc_info=exc)
            _tempfail_pending(machine, writer)
            self.error = exc
        finally:
            ctx = self.ctx or ctx
            if not self.closed:  # however it ended, close handlers run once
                with contextlib.suppress(Exception):
                    await self._close_session(ConnectionClosed())
            ctx.message.close()
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    def _log(self) -> Any:
        assert self.ctx is not None
        return self.ctx.log

    def _new_context(self, peer: str, writer: asyncio.StreamWriter) -> Context:
        """Start a session: a fresh context (one per SMTP session on this connection)."""
        machine = self.machine

        async def progress() -> None:
            writer.write(machine.send(Progress()))
            await writer.drain()

        config = self.app.config
        ctx = Context(
            app_name=self.app.name,
            conn_id=self.conn_id if not self._sessions else f"{self.conn_id}.{self._sessions}",
            peer=peer,
            macros=machine.macros,
            spool_threshold=config.spool_threshold if config.keep_message else None,
            progress=progress,
        )
        ctx.options = machine.options  # known already when a connection is reused (QUIT_NC)
        ctx.raise_errors = self.raise_errors
        self._sessions += 1
        self.ctx = ctx
        self.closed = False
        return ctx

    async def _close_session(self, event: CloseEvent) -> None:
        assert self.ctx is not None
        self.closed = True
        await self.app.dispatch("close", event, self.ctx)

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        app = self.app
        assert self.ctx is not None
        await app.dispatch("open", ConnectionOpened(peer=self.ctx.peer), self.ctx)
        idle = _IdleTimer(self.timeout, writer)
        try:
            await self._serve(reader, writer, idle)
        finally:
            idle.cancel()

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, idle: _IdleTimer
    ) -> None:
        machine = self.machine
        app = self.app
        assert self.ctx is not None
        while True:
            self.idle = machine.state is not ConnectionState.MESSAGE
            if self.idle and self._stopping():
                self.ctx.log.info("closing_for_shutdown")
                return
            data = await reader.read(READ_SIZE)
            if idle.expired:
                self.ctx.log.info("idle_timeout", timeout=self.timeout)
                return
            idle.touch()
            self.idle = False
            machine.receive_data(data)
            while (event := machine.next_event()) is not None:
                if isinstance(event, Quit | QuitNoClose | ConnectionClosed):
                    await self._close_session(event)
                    if not isinstance(event, QuitNoClose):
                        await writer.drain()
                        return
                    # The same socket carries a new SMTP session from here.
                    ctx = self._new_context(self.ctx.peer, writer)
                    await app.dispatch("open", ConnectionOpened(peer=ctx.peer), ctx)
                    continue
                out = await self._on_event(machine, self.ctx, event, writer)
                if out:
                    writer.write(out)
            if writer.transport.get_write_buffer_size():
                await writer.drain()
            elif writer.transport.is_closing() and not idle.expired:
                # The MTA reset the connection: stop running handlers for a peer that is gone.
                raise ConnectionResetError("the MTA closed the connection")

    async def _on_event(
        self, machine: MilterConnection, ctx: Context, event: Event, writer: asyncio.StreamWriter
    ) -> bytes:
        app = self.app
        name = _HANDLER_NAMES.get(type(event))
        if name is None:
            return await self._on_other(machine, ctx, event)
        message = ctx.message
        refused = self._refused
        if refused is not None and name in _MESSAGE_STAGES:
            if refused[0] is message:  # over a limit already: answer at the first chance
                return self._refuse(machine, ctx, refused[1]) if machine.awaiting_reply else b""
            self._refused = None  # that message is over
        if name == "envfrom":
            assert isinstance(event, EnvFrom)
            ctx.new_message()
            ctx.message.sender = event
        elif name == "envrcpt":
            assert isinstance(event, EnvRcpt)
            limit = self.max_recipients
            if limit and len(message.recipients) >= limit:
                return self._over_limit(
                    machine, ctx, name, "max_recipients", limit, TOO_MANY_RECIPIENTS
                )
            message.recipients.append(event)
        elif name == "header":
            assert isinstance(event, Header)
            limit = self.max_headers
            if limit and len(message.headers) >= limit:
                return self._over_limit(machine, ctx, name, "max_headers", limit, TOO_MANY_HEADERS)
            limit = self.max_header_size
            if limit and (size := _header_size(event, limit)) > limit:
                return self._over_limit(
                    machine, ctx, name, "max_header_size", limit, HEADER_TOO_LARGE, size=size
                )
            message.headers.append(event)
        elif name == "body":
            assert isinstance(event, Body)
            message.append_body(event.chunk)
        elif name == "connect":
            assert isinstance(event, Connect)
            ctx.client = event
            ctx.log = ctx.log.bind(client=str(event.address or event.hostname))
        elif name == "helo":
            assert isinstance(event, Helo)
            ctx.helo = event.name
        awaiting = machine.awaiting_reply
        if name == "eom":
            assert isinstance(event, EndOfMessage)
            verdict = await self._end_of_message(machine, ctx, event, writer)
        else:
            verdict = await app.dispatch(name, event, ctx)
        if not awaiting:
            if verdict is not None and not isinstance(verdict, Continue):
                ctx.log.warning("reply_ignored", stage=name, reply=repr(verdict))
            return b""
        return self._answer(machine, ctx, name, verdict)

    def _over_limit(
        self,
        machine: MilterConnection,
        ctx: Context,
        stage: str,
        limit: str,
        value: int,
        reply: TempFail,
        **facts: Any,
    ) -> bytes:
        """A command went over a limit: log it, and refuse it or its whole message."""
        ctx.log.warning("limit_exceeded", limit=limit, value=value, stage=stage, **facts)
        if stage == "envrcpt" and machine.awaiting_reply:
            return self._refuse(machine, ctx, reply)  # only this recipient: the message goes on
        # Without a reply to this command, the whole message gets one later (fail closed).
        self._refused = (ctx.message, reply)
        return self._refuse(machine, ctx, reply) if machine.awaiting_reply else b""

    def _refuse(self, machine: MilterConnection, ctx: Context, reply: TempFail) -> bytes:
        """Answer the pending command with ``reply``, without running handlers."""
        was_message = machine.state is ConnectionState.MESSAGE
        out = machine.send(reply)
        if was_message and machine.state is not ConnectionState.MESSAGE:
            ctx.new_message()
        return out

    async def _on_other(self, machine: MilterConnection, ctx: Context, event: Event) -> bytes:
        app = self.app
        if isinstance(event, Macros):
            limit = self.max_macros_per_packet
            if limit and len(event.values) > limit:
                ctx.log.warning(
                    "limit_exceeded",
                    limit="max_macros_per_packet",
                    value=limit,
                    count=len(event.values),
                    stage=event.stage,
                )
                raise RemoteProtocolError(
                    f"{len(event.values)} macros in one packet, above the limit of {limit}",
                    command="D",
                )
            return b""
        if isinstance(event, Negotiate):
            await app.dispatch("negotiate", event, ctx)
            try:
                reply = negotiate(event, self._requirements)
            except NegotiationError as exc:
                # As libmilter: close without replying; the MTA applies its failure policy.
                ctx.log.error("negotiation_failed", error=str(exc))
                raise ConnectionAbortedError(str(exc)) from exc
            out = machine.send(reply)
            ctx.options = machine.options
            return out
        if isinstance(event, Abort):
            await app.dispatch("abort", event, ctx)
            ctx.new_message()
        return b""

    async def _end_of_message(
        self,
        machine: MilterConnection,
        ctx: Context,
        event: EndOfMessage,
        writer: asyncio.StreamWriter,
    ) -> Verdict | Shutdown | None:
        app = self.app
        if event.chunk:  # libmilter treats data in end of message as a last body chunk
            ctx.message.append_body(event.chunk)
            await app.dispatch("body", Body(chunk=event.chunk), ctx)
        ctx.enter_eom(True)
        task = asyncio.ensure_future(app.dispatch("eom", event, ctx))
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=app.config.progress_interval)
                if done:
                    return task.result()
                writer.write(machine.send(Progress()))
                await writer.drain()
        finally:
            if not task.done():
                task.cancel()

    def _answer(
        self, machine: MilterConnection, ctx: Context, name: str, verdict: Verdict | Shutdown | None
    ) -> bytes:
        verdict = verdict or Continue()
        if isinstance(verdict, Skip) and not (machine.options and machine.options.skip):
            verdict = Continue()  # a hint we cannot pass on (e.g. keep_message needs the body)
        out: list[bytes] = []
        was_message = machine.state is ConnectionState.MESSAGE
        if name == "eom":
            if isinstance(verdict, Continue | Accept):
                try:
                    options = machine.options
                    size = options.max_data_size if options else DEFAULT_MAX_DATA_SIZE
                    out.extend(machine.send(mod) for mod in ctx.take_modifications(size))
                except (LocalProtocolError, OSError, ValueError) as exc:
                    ctx.log.error("modification_failed", error=str(exc))
                    out.clear()
                    verdict = self.app.config.fallback
            ctx.enter_eom(False)
        if name == "envrcpt" and isinstance(verdict, Reject | TempFail) and ctx.message.recipients:
            ctx.message.recipients.pop()  # refused: the MTA will not deliver to it
        try:
            out.append(machine.send(verdict))
        except LocalProtocolError as exc:
            ctx.log.error("reply_refused", stage=name, reply=repr(verdict), error=str(exc))
            out.append(machine.send(TempFail()))
        if was_message and machine.state is not ConnectionState.MESSAGE:
            ctx.new_message()
        return b"".join(out)


def _header_size(event: Header, limit: int) -> int:
    """The header's size in bytes as received, computed exactly only near ``limit``."""
    size = len(event.name) + len(event.value)  # characters: at least a quarter of the bytes
    if 4 * size <= limit:
        return size
    return len(event.raw_name) + len(event.raw_value)


def _tempfail_pending(machine: MilterConnection, writer: asyncio.StreamWriter) -> None:
    """Answer a command still waiting with TempFail before the connection closes."""
    if machine.awaiting_reply and machine.pending_command != "O":
        with contextlib.suppress(Exception):
            writer.write(machine.send(TempFail()))


class _IdleTimer:
    """Closes the connection after ``timeout`` seconds without data from the MTA.

    One timer per period, not one per read: a read only records the time (the per-read
    ``asyncio.timeout`` cost about a tenth of the server's time under load).
    """

    __slots__ = ("_handle", "_last", "_loop", "_timeout", "_writer", "expired")

    def __init__(self, timeout: float, writer: asyncio.StreamWriter) -> None:
        self._loop = asyncio.get_running_loop()
        self._timeout = timeout
        self._writer = writer
        self._last = self._loop.time()
        self.expired = False
        self._handle = self._loop.call_later(timeout, self._check)

    def touch(self) -> None:
        self._last = self._loop.time()

    def _check(self) -> None:
        left = self._last + self._timeout - self._loop.time()
        if left > 0:
            self._handle = self._loop.call_later(left, self._check)
            return
        self.expired = True
        self._writer.transport.close()  # the pending read then returns end of file

    def cancel(self) -> None:
        self._handle.cancel()


def _no_delay(writer: asyncio.StreamWriter) -> None:
    """Send each reply at once: Nagle's algorithm would hold a small reply back until the
    MTA acknowledges the previous one, which its delayed ACKs make take ~40 ms."""
    sock = writer.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _peer(writer: asyncio.StreamWriter) -> str:
    name = writer.get_extra_info("peername")
    if isinstance(name, tuple) and len(name) >= 2:
        host = f"[{name[0]}]" if ":" in str(name[0]) else str(name[0])
        return f"{host}:{name[1]}"
    local = writer.get_extra_info("sockname")
    return str(name or local or "unknown")
