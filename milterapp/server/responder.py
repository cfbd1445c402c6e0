"""What the milter answers: each MTA event through the app's handlers, with the limits applied.

:class:`Responder` is the one place where a connection's replies are made: the negotiation
reply, each verdict, the modifications of an end of message, the progress packets sent while
a handler runs long, and the TempFail that a command still waiting gets when the connection
fails or shuts down. It also keeps the server's record of the session in the context (the
client, the HELO name, the message's envelope and headers, and the body when the app keeps
it), applies the per-message limits, and opens and closes sessions.

While every handler involved is a plain function the reply is made at once (``bytes``);
otherwise a coroutine that gives the bytes is returned, for the connection
(:mod:`milterapp.server.connection`) to await. It writes nothing itself but progress packets,
through the ``write_now`` function it is given.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Final

import structlog

from milterapp.constants import DEFAULT_MAX_DATA_SIZE, Command, ConnectionState
from milterapp.context import Context
from milterapp.errors import LocalProtocolError, NegotiationError
from milterapp.events import (
    Abort,
    Body,
    Connect,
    ConnectionOpened,
    EndOfMessage,
    EnvFrom,
    EnvRcpt,
    Event,
    Header,
    Helo,
    Macros,
    Negotiate,
)
from milterapp.protocol.machine import UNPARSED, MilterConnection
from milterapp.protocol.negotiation import Requirements, negotiate
from milterapp.protocol.stages import BY_COMMAND, BY_NAME, MESSAGE_STAGES, SEQUENCE, STAGES
from milterapp.replies import (
    Accept,
    Continue,
    NegotiationReply,
    Progress,
    Reject,
    Shutdown,
    Skip,
    TempFail,
)
from milterapp.server.limits import (
    HEADER_TOO_LARGE,
    TOO_MANY_HEADERS,
    TOO_MANY_RECIPIENTS,
    Limits,
)
from milterapp.server.metrics import Metrics
from milterapp.server.outcomes import (
    count_modification,
    enabled_for,
    log_connection,
    log_message,
    verdict_name,
)
from milterapp.server.servable import Outcome, Servable, decided

__all__ = ["Responder", "Response"]

#: The reply to one event: its bytes now, or a coroutine that gives them.
Response = bytes | Coroutine[Any, Any, bytes]

_NEGOTIATIONS_KEPT: Final = 64
#: The stages whose handlers may reply, by event model (the others are observed only).
_REPLYING_STAGES: Final[dict[type[Event], str]] = {
    stage.event: stage.name for stage in STAGES if not stage.observer
}
#: Stages of a message that a refused message no longer runs handlers for (the first, MAIL,
#: opens a new message).
_LATER_MESSAGE_STAGES: Final = frozenset(stage.name for stage in MESSAGE_STAGES[1:])
#: The stages that Postfix's cleanup server, not its SMTP server, asks the milter about.
_POSTFIX_CONTENT_STAGES: Final = frozenset({"header", "eoh", "body", "eom"})
_MESSAGE: Final = ConnectionState.MESSAGE
_NO_LIMIT: Final = 1 << 62  # max_recipients=0
_EOH = ord(Command.EOH.value)
_CONNECT, _MAIL, _RCPT, _HEADER, _BODY = (
    ord(c.value)
    for c in (Command.CONNECT, Command.MAIL, Command.RCPT, Command.HEADER, Command.BODY)
)


class Responder:
    """The replies of one connection; see the module docstring.

    Args:
        app: what is served (an App).
        requirements: what to negotiate (``app.requirements()``, computed once per server).
        machine: the connection's protocol state machine.
        limits: the per-message limits.
        conn_id: the connection's id in logs and ``ctx.conn_id``.
        write_now: writes bytes at once and returns when the transport takes more (progress
            packets are sent while a handler runs).
        raise_errors: let handler exceptions escape instead of the fallback reply (tests).
        log: the structlog logger that each session's ``ctx.log`` binds to.
        negotiations: negotiation replies by offer, shared by one server's connections
            (they have the same requirements).
        metrics: where to count what happens (``--metrics``), if anywhere.

    Attributes:
        ctx: the current session's context (None before the first session opens).
        closed: the current session's close handlers ran (or are running).
    """

    def __init__(
        self,
        app: Servable,
        requirements: Requirements,
        machine: MilterConnection,
        limits: Limits,
        *,
        conn_id: str,
        write_now: Callable[[bytes], Awaitable[None]],
        raise_errors: bool = False,
        log: Any = None,
        negotiations: dict[tuple[int, int, int], NegotiationReply] | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.requirements = requirements
        self.machine = machine
        # The counts the per-packet path reads, as plain attributes (quicker than a model's).
        self._max_headers = limits.max_headers
        self._max_header_size = limits.max_header_size
        self._max_recipients = limits.max_recipients
        self.conn_id = conn_id
        self._headers_kept = "header" in requirements.events
        self._rejected_recipients = requirements.rejected_recipients
        self._leading_space = False  # negotiated HDR_LEADSPC: how kept headers are decoded
        self.negotiations = {} if negotiations is None else negotiations
        self.ctx: Context | None = None
        self.closed = False
        self._write_now: Callable[[bytes], Awaitable[None]] | None = write_now
        self._raise_errors = raise_errors
        self._log = log
        self._sessions = 0
        # What the administrator's log asks for (milterapp.server.outcomes), known once:
        # without it the per-message path skips the bookkeeping.
        base = log if log is not None else structlog.get_logger("milterapp")
        self.log_messages = enabled_for(base, logging.INFO)
        # (Unconfigured, structlog prints every level: a line per event is for those who ask.)
        self.log_events = enabled_for(base, logging.DEBUG) and structlog.is_configured()
        self.messages = 0  # messages ended in the current session
        self._session_started = 0.0
        #: perf_counter() when the command being answered began (the connection keeps it:
        #: a batch's start, then each reply's time), and the time spent answering the MTA
        #: since MAIL, summed over the commands answered: the message line's handler_ms.
        self.clock = 0.0
        self.spent = 0.0
        # The message that went over a limit, and the reply it gets (at most one at a time).
        self._refused: tuple[object, TempFail] | None = None

    # --- sessions ------------------------------------------------------------------------

    def open_session(self, peer: str) -> Response:
        """Start a session (one per SMTP session on the connection) with a fresh context,
        and run the ``open`` handlers."""
        machine = self.machine
        sessions = self._sessions
        self._sessions += 1
        self.messages = 0
        self._session_started = time.monotonic()
        config = self.app.config
        previous = self.ctx
        ctx = self.ctx = Context(
            app_name=self.app.name,
            conn_id=self.conn_id if not sessions else f"{self.conn_id}.{sessions}",
            peer=peer,
            macros=machine.macros,
            spool_threshold=config.kept_body_threshold,
            progress=self.progress,
            log=self._log,
            options=machine.options,  # known already when a connection is reused (QUIT_NC)
            raise_errors=self._raise_errors,
            headers_kept=self._headers_kept,
            message_state=config.message_state,
            connection_state=config.connection_state,
        )
        if self.metrics is not None:
            ctx.count_failure = self.metrics.handler_failed
            ctx.count_upstream_failure = self.metrics.upstream_failed
        if previous is not None:  # (a reused connection: its chain goes on)
            ctx.upstreams = previous.upstreams
        self.closed = False
        return _nothing_after(self.app.dispatch_now("open", ConnectionOpened(peer=peer), ctx))

    def close_session(self, event: Event) -> Response:
        """Run the ``close`` handlers of the current session."""
        assert self.ctx is not None
        if self.machine.kept:
            self._take_kept(self.ctx)
        self.closed = True
        if self.log_messages:
            log_connection(self.ctx, self.messages, self._session_started)
        return _nothing_after(self.app.dispatch_now("close", event, self.ctx))

    def release(self) -> None:
        """The connection is closing: release what the current message holds."""
        if self.ctx is not None:
            self.ctx.message.close()

    def detach(self) -> None:
        """The connection is over: drop the references back to it (its write function, the
        context's progress callback), so that its objects are freed by reference counting."""
        self._write_now = None
        if self.ctx is not None:
            self.ctx.detach()

    # --- events --------------------------------------------------------------------------

    def respond(self, event: Event) -> Response:
        """The reply to ``event`` (empty when the MTA expects none)."""
        if self.machine.kept:
            assert self.ctx is not None
            self._take_kept(self.ctx)
        name = _REPLYING_STAGES.get(type(event))
        if name is None:
            return self._on_other(event)
        ctx = self.ctx
        assert ctx is not None
        machine = self.machine
        message = ctx.message
        refused = self._refused
        if refused is not None and name in _LATER_MESSAGE_STAGES:
            if refused[0] is message:  # over a limit already: answer at the first chance
                return self._refuse(ctx, refused[1]) if machine.awaiting_reply else b""
            self._refused = None  # that message is over
        if name == "header":
            assert isinstance(event, Header)
            limit = self._max_header_size
            refusal = self._header_over_limit(ctx, _header_size(event, limit) if limit else 0)
            if refusal is not None:
                return refusal
            message.header_records.append(event)
        elif name == "body":
            assert isinstance(event, Body)
            message.append_body(event.chunk)
        elif name == "envrcpt":
            limit = self._max_recipients
            if limit and len(message.recipient_records) >= limit:
                return self._over_recipients(ctx)
            assert isinstance(event, EnvRcpt)
            return self._recipient(ctx, event)
        elif name == "envfrom":
            assert isinstance(event, EnvFrom)
            if message.begun:  # else it is the fresh one the last message ended with
                ctx.new_message()
            ctx.message.sender_record = event
            self._message_begins(ctx)
        elif name == "connect":
            assert isinstance(event, Connect)
            ctx.client = event
        elif name == "helo":
            assert isinstance(event, Helo)
            ctx.helo = event.name
        elif name == "eom":
            assert isinstance(event, EndOfMessage)
            return self._end_of_message(ctx, event)
        verdict = self.app.dispatch_now(name, event, ctx)
        if verdict is None or verdict.__class__ is Continue:  # the common case, at once
            return machine.continue_if_owed()
        awaiting = machine.awaiting_reply  # (plain handlers cannot have changed it)
        if not decided(verdict):
            return self._reply_later(name, awaiting, verdict)
        return self._reply(name, awaiting, verdict)

    def _recipient(self, ctx: Context, event: EnvRcpt) -> Response:
        """Run the ``envrcpt`` handlers, then count the recipient in if it was not refused:
        while they run, ``ctx.message.recipients`` holds the recipients before this one."""
        verdict = self.app.dispatch_now("envrcpt", event, ctx)
        if verdict is None or verdict.__class__ is Continue:  # the common case, at once
            if not (self._rejected_recipients and self._refused_by_mta(ctx)):
                ctx.message.recipient_records.append(event)
            return self.machine.continue_if_owed()
        awaiting = self.machine.awaiting_reply
        if not decided(verdict):
            return self._recipient_later(ctx, event, awaiting, verdict)
        return self._recipient_decided(ctx, event, awaiting, verdict)

    async def _recipient_later(
        self, ctx: Context, event: EnvRcpt, awaiting: bool, outcome: Awaitable[Outcome]
    ) -> bytes:
        return self._recipient_decided(ctx, event, awaiting, await outcome)

    def _recipient_decided(
        self, ctx: Context, event: EnvRcpt, awaiting: bool, verdict: Outcome
    ) -> bytes:
        refused = awaiting and isinstance(verdict, Reject | TempFail)
        if refused:
            ctx.message.refused_recipients += 1
        elif not (self._rejected_recipients and self._refused_by_mta(ctx)):
            ctx.message.recipient_records.append(event)
        if verdict is None or verdict.__class__ is Continue:
            return self.machine.continue_if_owed()
        return self._reply("envrcpt", awaiting, verdict)

    def _refused_by_mta(self, ctx: Context) -> bool:
        # With RCPT_REJ (self._rejected_recipients, which callers test first: it is cheaper
        # than this call) the MTA also shows the recipients it refused itself, marked so.
        return ctx.macros.get("rcpt_mailer") == "error"

    def _record(self, ctx: Context) -> bytes:
        """Keep a command that no handler reads and that needs a reply (:data:`UNPARSED`)."""
        command, payload = self.machine.unparsed
        if not self._keep(ctx, command, payload):
            return self._over_recipients(ctx, awaiting=True)
        return self.machine.continue_if_owed()

    def _take_kept(self, ctx: Context) -> None:
        """Keep for the context the commands that the machine kept without an event."""
        kept = self.machine.kept
        limit = self._max_recipients or _NO_LIMIT
        for command, payload in kept:
            message = ctx.message
            if (
                command == _RCPT
                and not self._rejected_recipients
                and len(records := message.recipient_records) < limit
            ):
                records.append(payload)  # _keep() in place, for the usual one
                message.records_undecoded = True
            elif not self._keep(ctx, command, payload):
                self._over_recipients(ctx, awaiting=False)  # no reply was owed for it
        kept.clear()

    def _over_recipients(self, ctx: Context, *, awaiting: bool | None = None) -> bytes:
        limit = self._max_recipients
        return self._over_limit(
            ctx, "envrcpt", "max_recipients", limit, TOO_MANY_RECIPIENTS, awaiting=awaiting
        )

    def _keep(self, ctx: Context, command: int, payload: bytes) -> bool:
        """Give the context a command kept undecoded; False for a recipient over the limit
        (not kept)."""
        message = ctx.message
        if command == _RCPT:
            limit = self._max_recipients
            if limit and len(message.recipient_records) >= limit:
                return False
            if not (self._rejected_recipients and self._refused_by_mta(ctx)):
                message.recipient_records.append(payload)
                message.records_undecoded = True
        elif command == _MAIL:
            if message.sender_record is not None or message.recipient_records:
                ctx.new_message()  # (else it is the fresh one the last message ended with)
            ctx.message.sender_record = payload
            self._message_begins(ctx)
        elif command == _HEADER:
            self._keep_header(ctx, payload)
        elif command == _BODY:
            message.append_body(payload)
        elif command == _CONNECT:
            ctx.client = payload
        elif command != _EOH:
            ctx.helo = payload
        return True

    def _keep_header(self, ctx: Context, payload: bytes) -> None:
        """Keep a header no handler reads, its limits applied as to a decoded one."""
        # (The name and the value, without their NULs.)
        if self._header_over_limit(ctx, len(payload) - 2, awaiting=False) is not None:
            return
        message = ctx.message
        message.header_records.append(payload)
        message.headers_undecoded = True
        message.headers_leading_space = self._leading_space

    def _header_over_limit(
        self, ctx: Context, size: int, *, awaiting: bool | None = None
    ) -> bytes | None:
        """Refuse a header (``size``: its name and value in bytes) over ``max_headers`` or
        ``max_header_size``, as :meth:`_over_limit` does; None when it is within both."""
        limit = self._max_headers
        if limit and len(ctx.message.header_records) >= limit:
            return self._over_limit(
                ctx, "header", "max_headers", limit, TOO_MANY_HEADERS, awaiting=awaiting
            )
        limit = self._max_header_size
        if limit and size > limit:
            return self._over_limit(
                ctx,
                "header",
                "max_header_size",
                limit,
                HEADER_TOO_LARGE,
                awaiting=awaiting,
                size=size,
            )
        return None

    async def _reply_later(self, name: str, awaiting: bool, outcome: Awaitable[Outcome]) -> bytes:
        return self._reply(name, awaiting, await outcome)

    def _reply(self, name: str, awaiting: bool, verdict: Outcome) -> bytes:
        if not awaiting:
            if verdict is not None and not isinstance(verdict, Continue):
                assert self.ctx is not None
                self.ctx.log.warning("reply_ignored", stage=name, reply=repr(verdict))
            return b""
        return self._answer(name, verdict)

    def _on_other(self, event: Event) -> Response:
        ctx = self.ctx
        assert ctx is not None
        if event is UNPARSED:
            return self._record(ctx)
        if isinstance(event, Macros):
            return b""  # the machine keeps them (and applies max_macros_per_packet)
        if isinstance(event, Negotiate):
            observed = self.app.dispatch_now("negotiate", event, ctx)
            if not decided(observed):
                return self._negotiate_later(event, observed)
            return self._negotiate(event)
        if isinstance(event, Abort):
            observed = self.app.dispatch_now("abort", event, ctx)
            if not decided(observed):
                return self._abort_later(observed)
            self._message_done(ctx, self._stage_reached(), None, how="abort")
            ctx.new_message()
        return b""

    async def _negotiate_later(self, event: Negotiate, observed: Awaitable[Outcome]) -> bytes:
        await observed
        return self._negotiate(event)

    def _negotiate(self, event: Negotiate) -> bytes:
        ctx = self.ctx
        assert ctx is not None
        key = (event.version, int(event.actions), int(event.protocol))
        try:
            reply = self.negotiations.get(key) or negotiate(event, self.requirements)
            own = reply
            reply = self.app.negotiated(event, reply, ctx)
        except NegotiationError as exc:
            # As libmilter: close without replying; the MTA applies its failure policy.
            ctx.log.error("negotiation_failed", error=str(exc))
            raise ConnectionAbortedError(str(exc)) from exc
        out = self.machine.send(reply)
        if len(self.negotiations) < _NEGOTIATIONS_KEPT:
            self.negotiations[key] = own
        options = ctx.options = self.machine.options
        self._leading_space = bool(options and options.leading_space)
        return out

    async def _abort_later(self, observed: Awaitable[Outcome]) -> bytes:
        await observed
        assert self.ctx is not None
        self._message_done(self.ctx, self._stage_reached(), None, how="abort")
        self.ctx.new_message()
        return b""

    # --- end of message ------------------------------------------------------------------

    def _end_of_message(self, ctx: Context, event: EndOfMessage) -> Response:
        app = self.app
        if event.chunk:  # libmilter treats data in end of message as a last body chunk
            ctx.message.append_body(event.chunk)
            body = app.dispatch_now("body", Body(chunk=event.chunk), ctx)
            if not decided(body):
                return self._end_of_message_later(ctx, event, body)
        ctx.enter_eom(True)
        verdict = app.dispatch_now("eom", event, ctx)
        if not decided(verdict):
            return self._with_progress(verdict)
        return self._answer("eom", verdict)

    async def _end_of_message_later(
        self, ctx: Context, event: EndOfMessage, body: Awaitable[Outcome]
    ) -> bytes:
        await body
        ctx.enter_eom(True)
        verdict = self.app.dispatch_now("eom", event, ctx)
        if not decided(verdict):
            return await self._with_progress(verdict)
        return self._answer("eom", verdict)

    async def _with_progress(self, outcome: Coroutine[Any, Any, Outcome]) -> bytes:
        """Await the end-of-message handlers, sending progress packets while they run.

        A timer sends them, so that a handler that answers in time costs no second task.
        """
        loop = asyncio.get_running_loop()
        interval = self.app.config.progress_interval
        ticking: list[asyncio.Task[None]] = []
        timers: list[asyncio.TimerHandle] = []

        def tick() -> None:
            ticking.append(loop.create_task(self.progress()))
            timers.append(loop.call_later(interval, tick))

        timers.append(loop.call_later(interval, tick))
        try:
            verdict = await outcome
        finally:
            timers[-1].cancel()
        for task in ticking:
            await task  # each progress packet is out before the answer
        return self._answer("eom", verdict)

    # --- answers -------------------------------------------------------------------------

    async def progress(self) -> None:
        """Send a progress packet now: the MTA restarts its timer (end of message only)."""
        write = self._write_now
        if write is not None:
            await write(self.machine.send(Progress()))
            if self.metrics is not None:
                self.metrics.progress_sent()

    def tempfail_pending(self) -> bytes:
        """TempFail for a command still waiting for its reply, as the connection ends
        abnormally (fail closed); nothing if none waits (or only negotiation does)."""
        machine = self.machine
        if machine.awaiting_reply and machine.pending_command != "O":
            try:
                return machine.send(TempFail())
            except LocalProtocolError:
                return b""
        return b""

    def _answer(self, name: str, verdict: Outcome) -> bytes:
        machine = self.machine
        if (verdict is None or verdict.__class__ is Continue) and name != "eom":
            return machine.send_continue()  # the common case, without allocation
        ctx = self.ctx
        assert ctx is not None
        verdict = verdict or Continue()
        if verdict.__class__ is Shutdown:
            verdict = self._shutdown_or_tempfail(ctx, name)
        if isinstance(verdict, Skip) and not (machine.options and machine.options.skip):
            verdict = Continue()  # a hint we cannot pass on (e.g. keep_message needs the body)
        out: list[bytes] = []
        was_message = machine.state is _MESSAGE
        if name == "eom":
            if isinstance(verdict, Continue | Accept):
                try:
                    options = machine.options
                    size = options.max_data_size if options else DEFAULT_MAX_DATA_SIZE
                    for mod in ctx.take_modifications(size):
                        out.append(machine.send(mod))
                        if self.log_messages:
                            count_modification(ctx.message, mod)
                except (LocalProtocolError, OSError, ValueError) as exc:
                    ctx.log.error("modification_failed", error=str(exc))
                    out.clear()
                    verdict = self.app.config.fallback
            ctx.enter_eom(False)
        try:
            out.append(machine.send(verdict))
        except LocalProtocolError as exc:
            ctx.log.error("reply_refused", stage=name, reply=repr(verdict), error=str(exc))
            verdict = TempFail()
            out.append(machine.send(verdict))
        if was_message and machine.state is not _MESSAGE:
            self._message_done(ctx, name, verdict)
            ctx.new_message()
        return b"".join(out)

    def _shutdown_or_tempfail(self, ctx: Context, stage: str) -> Shutdown | TempFail:
        """Shutdown where the MTA honours it, else TempFail: nothing may be lost by it.

        Only Postfix answers Shutdown with 421 (its ``v`` macro, sent by default, says it is
        Postfix). Up to 3.10 it does so only before the content: at ``header`` to ``eom``
        its cleanup server drops the message after telling the client it was queued.
        Sendmail takes Shutdown for a broken filter and applies the filter's ``F=`` flag,
        which without a flag lets the mail through unfiltered (tests/e2e/test_mta_replies.py).
        """
        mta = self.machine.macros.get("v") or ""
        if mta.startswith("Postfix "):
            version = tuple(int(part) for part in re.findall(r"\d+", mta)[:2])
            if stage not in _POSTFIX_CONTENT_STAGES or version >= (3, 11):
                return Shutdown()
            why = "Postfix up to 3.10 drops the message after a shutdown at this stage"
        else:
            why = "only Postfix honours it (this MTA did not send a Postfix 'v' macro)"
        ctx.log.warning("shutdown_replaced", stage=stage, reply="TempFail()", mta=mta, why=why)
        return TempFail()

    def _over_limit(
        self,
        ctx: Context,
        stage: str,
        limit: str,
        value: int,
        reply: TempFail,
        *,
        awaiting: bool | None = None,
        **facts: Any,
    ) -> bytes:
        """A command went over a limit: log it, and refuse it or its whole message.

        ``awaiting``: whether that command waits for a reply (by default, whether the
        machine waits for one: not so for a command kept earlier without an event).
        """
        ctx.log.warning("limit_exceeded", limit=limit, value=value, stage=stage, **facts)
        if self.metrics is not None:
            self.metrics.limit_exceeded(limit)
        if awaiting is None:
            awaiting = self.machine.awaiting_reply
        if stage == "envrcpt":
            ctx.message.refused_recipients += 1
        if awaiting and isinstance(reply, BY_NAME[stage].goes_on):
            return self._refuse(ctx, reply)  # only this command (a recipient): the message goes on
        # Without a reply to this command, the whole message gets one later (fail closed).
        self._refused = (ctx.message, reply)
        return self._refuse(ctx, reply) if awaiting else b""

    def _refuse(self, ctx: Context, reply: TempFail) -> bytes:
        """Answer the pending command with ``reply``, without running handlers."""
        machine = self.machine
        was_message = machine.state is _MESSAGE
        out = machine.send(reply)
        if was_message and machine.state is not _MESSAGE:
            self._message_done(ctx, self._stage_reached(), reply)
            ctx.new_message()
        return out

    # --- the administrator's log ---------------------------------------------------------

    def _stage_reached(self) -> str:
        """The name of the last message stage the MTA reached."""
        rank = self.machine.rank
        return BY_COMMAND[ord(SEQUENCE[rank])].name if rank >= 0 else "envfrom"

    def _message_done(
        self, ctx: Context, stage: str, verdict: Any, *, how: str | None = None
    ) -> None:
        """The message ends: its log line, with the time of the event that ended it."""
        self.messages += 1
        metrics = self.metrics
        if metrics is None and not self.log_messages:
            return
        outcome = how or verdict_name(verdict, stage)
        message = ctx.message
        if metrics is not None:
            metrics.message_done(outcome, stage, message.refused_recipients, message.body_size)
        if self.log_messages:
            # The commands answered so far, and the one that ends the message (so far).
            message.handler_seconds = self.spent + (time.perf_counter() - self.clock)
            log_message(ctx, stage, verdict, outcome)

    def _message_begins(self, ctx: Context) -> None:
        """MAIL came: the message's clocks start (MAIL's own time counts to it)."""
        if self.log_messages:
            ctx.message.started = self.clock
            self.spent = 0.0


def _nothing_after(observed: Outcome | Coroutine[Any, Any, Outcome]) -> Response:
    """Observers reply nothing: wait for them if they must be awaited."""
    if not decided(observed):
        return _await_nothing(observed)
    return b""


async def _await_nothing(observed: Awaitable[Outcome]) -> bytes:
    await observed
    return b""


def _header_size(event: Header, limit: int) -> int:
    """The header's size in bytes as received, computed exactly only near ``limit`` (here, in
    a compiled module, for it runs for every header)."""
    size = len(event.name) + len(event.value)  # characters: at least a quarter of the bytes
    if 4 * size <= limit:
        return size
    return len(event.raw_name) + len(event.raw_value)
