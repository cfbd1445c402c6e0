"""What to answer: each MTA event through the App's handlers, with the limits applied.

:class:`Steps` turns one event into the bytes of its reply. While every handler involved is a
plain function the answer is computed at once (``bytes``); otherwise a coroutine that gives
the bytes is returned, for the connection handler (:mod:`milterapp.session`) to await. It
knows nothing of transports: it writes nothing itself, except progress packets through the
callback it is given.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Final

from milterapp.app import App, CloseEvent, Pending
from milterapp.context import Context
from milterapp.errors import LocalProtocolError, NegotiationError
from milterapp.events import (
    Abort,
    Body,
    Connect,
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
    Unknown,
)
from milterapp.limits import (
    HEADER_TOO_LARGE,
    TOO_MANY_HEADERS,
    TOO_MANY_RECIPIENTS,
    Limits,
    header_size,
)
from milterapp.protocol.constants import DEFAULT_MAX_DATA_SIZE
from milterapp.protocol.machine import ConnectionState, MilterConnection
from milterapp.protocol.negotiation import Requirements, negotiate
from milterapp.replies import (
    Accept,
    Continue,
    NegotiationReply,
    Reject,
    Shutdown,
    Skip,
    TempFail,
    Verdict,
)

__all__ = ["Step", "Steps"]

#: The reply to one event: its bytes now, or a coroutine that gives them.
Step = bytes | Coroutine[Any, Any, bytes]
Outcome = Verdict | Shutdown | None

_NEGOTIATIONS_KEPT: Final = 64
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


class Steps:
    """The replies of one connection's App; see the module docstring.

    Args:
        negotiations: negotiation replies by offer, to share between the connections of one
            server (they have the same requirements).

    Attributes:
        ctx: the current session's context (the connection handler sets it).
        progress: sends a progress packet (the connection handler sets it).
        closed: the current session's close handlers ran (or are running).
    """

    def __init__(
        self,
        app: App,
        requirements: Requirements,
        machine: MilterConnection,
        limits: Limits,
        negotiations: dict[tuple[int, int, int], NegotiationReply] | None = None,
    ) -> None:
        self.app = app
        self.requirements = requirements
        # Replies by offer, shared by the connections of one server (same requirements).
        self.negotiations = {} if negotiations is None else negotiations
        self.machine = machine
        self.limits = limits
        self.ctx: Context | None = None
        self.progress: Callable[[], Awaitable[None]] | None = None
        self.closed = False
        # The message that went over a limit, and the reply it gets (at most one at a time).
        self._refused: tuple[object, TempFail] | None = None

    # --- sessions ------------------------------------------------------------------------

    def open_session(self, ctx: Context) -> Step:
        self.closed = False
        return _nothing_after(self.app.dispatch_now("open", ConnectionOpened(peer=ctx.peer), ctx))

    def close_session(self, event: CloseEvent) -> Step:
        assert self.ctx is not None
        self.closed = True
        return _nothing_after(self.app.dispatch_now("close", event, self.ctx))

    # --- events --------------------------------------------------------------------------

    def on_event(self, event: Event) -> Step:
        """The reply to ``event`` (empty when the MTA expects none)."""
        name = _HANDLER_NAMES.get(type(event))
        if name is None:
            return self._on_other(event)
        ctx = self.ctx
        assert ctx is not None
        machine = self.machine
        message = ctx.message
        refused = self._refused
        if refused is not None and name in _MESSAGE_STAGES:
            if refused[0] is message:  # over a limit already: answer at the first chance
                return self._refuse(ctx, refused[1]) if machine.awaiting_reply else b""
            self._refused = None  # that message is over
        limits = self.limits
        if name == "header":
            assert isinstance(event, Header)
            limit = limits.max_headers
            if limit and len(message.headers) >= limit:
                return self._over_limit(ctx, name, "max_headers", limit, TOO_MANY_HEADERS)
            limit = limits.max_header_size
            if limit and (size := header_size(event, limit)) > limit:
                return self._over_limit(
                    ctx, name, "max_header_size", limit, HEADER_TOO_LARGE, size=size
                )
            message.headers.append(event)
        elif name == "body":
            assert isinstance(event, Body)
            message.append_body(event.chunk)
        elif name == "envrcpt":
            limit = limits.max_recipients
            if limit and len(message.recipients) >= limit:
                return self._over_limit(ctx, name, "max_recipients", limit, TOO_MANY_RECIPIENTS)
            assert isinstance(event, EnvRcpt)
            message.recipients.append(event)
        elif name == "envfrom":
            assert isinstance(event, EnvFrom)
            ctx.new_message()
            ctx.message.sender = event
        elif name == "connect":
            assert isinstance(event, Connect)
            ctx.client = event
            ctx.bind_log(client=str(event.address or event.hostname))
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
        if isinstance(verdict, Pending):
            return self._reply_later(name, awaiting, verdict.awaitable)
        return self._reply(name, awaiting, verdict)

    async def _reply_later(self, name: str, awaiting: bool, outcome: Awaitable[Outcome]) -> bytes:
        return self._reply(name, awaiting, await outcome)

    def _reply(self, name: str, awaiting: bool, verdict: Outcome) -> bytes:
        if not awaiting:
            if verdict is not None and not isinstance(verdict, Continue):
                assert self.ctx is not None
                self.ctx.log.warning("reply_ignored", stage=name, reply=repr(verdict))
            return b""
        return self._answer(name, verdict)

    def _on_other(self, event: Event) -> Step:
        ctx = self.ctx
        assert ctx is not None
        if isinstance(event, Macros):
            return b""  # the machine keeps them (and applies max_macros_per_packet)
        if isinstance(event, Negotiate):
            observed = self.app.dispatch_now("negotiate", event, ctx)
            if isinstance(observed, Pending):
                return self._negotiate_later(event, observed.awaitable)
            return self._negotiate(event)
        if isinstance(event, Abort):
            observed = self.app.dispatch_now("abort", event, ctx)
            if isinstance(observed, Pending):
                return self._abort_later(observed.awaitable)
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
        except NegotiationError as exc:
            # As libmilter: close without replying; the MTA applies its failure policy.
            ctx.log.error("negotiation_failed", error=str(exc))
            raise ConnectionAbortedError(str(exc)) from exc
        out = self.machine.send(reply)
        if len(self.negotiations) < _NEGOTIATIONS_KEPT:
            self.negotiations[key] = reply
        ctx.options = self.machine.options
        return out

    async def _abort_later(self, observed: Awaitable[Outcome]) -> bytes:
        await observed
        assert self.ctx is not None
        self.ctx.new_message()
        return b""

    # --- end of message ------------------------------------------------------------------

    def _end_of_message(self, ctx: Context, event: EndOfMessage) -> Step:
        app = self.app
        if event.chunk:  # libmilter treats data in end of message as a last body chunk
            ctx.message.append_body(event.chunk)
            body = app.dispatch_now("body", Body(chunk=event.chunk), ctx)
            if isinstance(body, Pending):
                return self._end_of_message_later(ctx, event, body.awaitable)
        ctx.enter_eom(True)
        verdict = app.dispatch_now("eom", event, ctx)
        if isinstance(verdict, Pending):
            return self._with_progress(verdict.awaitable)
        return self._answer("eom", verdict)

    async def _end_of_message_later(
        self, ctx: Context, event: EndOfMessage, body: Awaitable[Outcome]
    ) -> bytes:
        await body
        ctx.enter_eom(True)
        verdict = self.app.dispatch_now("eom", event, ctx)
        if isinstance(verdict, Pending):
            return await self._with_progress(verdict.awaitable)
        return self._answer("eom", verdict)

    async def _with_progress(self, outcome: Coroutine[Any, Any, Outcome]) -> bytes:
        """Await the end-of-message handlers, sending progress packets while they run."""
        task = asyncio.ensure_future(outcome)
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=self.app.config.progress_interval)
                if done:
                    return self._answer("eom", task.result())
                assert self.progress is not None
                await self.progress()
        finally:
            if not task.done():
                task.cancel()

    # --- answers -------------------------------------------------------------------------

    def _answer(self, name: str, verdict: Outcome) -> bytes:
        machine = self.machine
        if (verdict is None or verdict.__class__ is Continue) and name != "eom":
            return machine.send_continue()  # the common case, without allocation
        ctx = self.ctx
        assert ctx is not None
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

    def _over_limit(
        self, ctx: Context, stage: str, limit: str, value: int, reply: TempFail, **facts: Any
    ) -> bytes:
        """A command went over a limit: log it, and refuse it or its whole message."""
        ctx.log.warning("limit_exceeded", limit=limit, value=value, stage=stage, **facts)
        awaiting = self.machine.awaiting_reply
        if stage == "envrcpt" and awaiting:
            return self._refuse(ctx, reply)  # only this recipient: the message goes on
        # Without a reply to this command, the whole message gets one later (fail closed).
        self._refused = (ctx.message, reply)
        return self._refuse(ctx, reply) if awaiting else b""

    def _refuse(self, ctx: Context, reply: TempFail) -> bytes:
        """Answer the pending command with ``reply``, without running handlers."""
        machine = self.machine
        was_message = machine.state is ConnectionState.MESSAGE
        out = machine.send(reply)
        if was_message and machine.state is not ConnectionState.MESSAGE:
            ctx.new_message()
        return out


def _nothing_after(observed: Outcome | Pending) -> Step:
    """Observers reply nothing: wait for them if they must be awaited."""
    if isinstance(observed, Pending):
        return _await_nothing(observed.awaitable)
    return b""


async def _await_nothing(observed: Awaitable[Outcome]) -> bytes:
    await observed
    return b""
