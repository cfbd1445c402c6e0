"""One MTA connection's chain: the app's own handlers and its upstream milters as one milter.

:class:`ChainSession` is made when the MTA negotiates. It connects to every upstream (or
takes a kept connection), negotiates the MTA's offer with each, and gives the MTA one reply
for all (:func:`~milterapp.chain.negotiation.combine`). Then, command by command:

- **Envelope** (connect, HELO, MAIL, RCPT, DATA, unknown): the parties are asked in the
  chain's order, each given the command as its own negotiation asked for it, with the
  macros it asked for; :class:`~milterapp.chain.referee.Referee` combines their verdicts.
- **Content** (headers, end of headers, body): the app's own handlers see it as it comes;
  the upstreams are given it at end of message, each in turn, from the message the server
  keeps, with the edits of the parties before it applied
  (:class:`~milterapp.chain.edits.MessageEdits`), as Postfix and Sendmail replay their
  queue file to one milter after the other.
- **End of message**: each party in order; their edits go to the MTA with the verdict.

An upstream that fails gets its policy: ``accept`` drops it for the connection, ``tempfail``
and ``reject`` answer for it from then on (fail closed). Conditions (``when=``) are asked at
their stage: an upstream that does not apply is not sent the rest of that message (or
connection, at CONNECT and HELO).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, Final

from milterapp.chain.edits import MessageEdits
from milterapp.chain.forwarding import for_party
from milterapp.chain.headers import POSTFIX_RULES, SENDMAIL_RULES, HeaderRules
from milterapp.chain.negotiation import combine, macros_for
from milterapp.chain.party import UpstreamMilter
from milterapp.chain.referee import Referee
from milterapp.chain.upstream import UpstreamConnection, UpstreamFailure
from milterapp.constants import MacroStage, ProtocolFlag
from milterapp.context import Context
from milterapp.errors import LocalProtocolError, MilterError
from milterapp.events import (
    Body,
    EndOfHeaders,
    EndOfMessage,
    Event,
    Header,
    Macros,
    Negotiate,
)
from milterapp.protocol.macros import MacroTable
from milterapp.protocol.negotiation import SessionOptions, session_options
from milterapp.protocol.stages import BY_NAME, STAGES
from milterapp.replies import (
    RESTRICTIVE,
    Accept,
    Continue,
    Discard,
    Modification,
    NegotiationReply,
    Reject,
    Shutdown,
    Skip,
    TempFail,
    Verdict,
)
from milterapp.server.servable import Outcome, decided

__all__ = ["ChainSession", "Dispatch"]

#: How the session runs the app's own handlers (``Dispatcher.dispatch_now``).
Dispatch = Callable[[str, Event, Context], Outcome | Coroutine[Any, Any, Outcome]]

_ENVELOPE: Final = frozenset({"connect", "helo", "envfrom", "envrcpt", "data", "unknown"})
_CONTENT: Final = frozenset({"header", "eoh", "body"})
_CONNECTION_STAGES: Final = frozenset(s.name for s in STAGES if s.scope == "connection")
#: The macro stage of each command letter that has one.
_MACRO_STAGES: Final[dict[str, MacroStage]] = {
    stage.commands[:1].decode("latin-1"): stage.macros
    for stage in STAGES
    if stage.macros is not None and stage.commands
}
#: Upstreams are replayed the content at end of message: the MTA need not wait for replies
#: to content on their account.
_BUFFERED: Final = ProtocolFlag.NR_HDR | ProtocolFlag.NR_EOH | ProtocolFlag.NR_BODY
_ENDS_PARTY: Final[tuple[type[object], ...]] = (*RESTRICTIVE, Accept)
#: Enough for the app's own replacement body in one piece (the MTA's limit applies later).
_WHOLE: Final = 1 << 62


async def _settle(result: Outcome | Coroutine[Any, Any, Outcome]) -> Outcome:
    if decided(result):
        return result
    return await result


def _braced(name: str) -> str:
    return name if len(name) == 1 else "{" + name + "}"


def _ends_party(verdict: Outcome) -> bool:
    """Whether ``verdict`` at a content command ends that party's part in the message."""
    return isinstance(verdict, _ENDS_PARTY)


class ChainSession:
    """The chain of one MTA connection; see the module docstring.

    Args:
        parties: in the chain's order, the upstreams and (as None) the app's own handlers.
        own: runs the app's own handlers.
    """

    def __init__(self, parties: Sequence[UpstreamMilter | None], own: Dispatch) -> None:
        self.parties = tuple(parties)
        self._own = own
        self._own_at = next((at for at, p in enumerate(self.parties) if p is None), None)
        self._names = [p.name if p is not None else "handlers" for p in self.parties]
        self.referee = Referee(self._names)
        self._links: list[UpstreamConnection | None] = [None] * len(self.parties)
        #: The reply a failed upstream (tempfail or reject policy) gives from then on.
        self._sticky: dict[int, Verdict] = {}
        self._in_message: set[int] = set()  # upstreams that were sent MAIL, not yet EOM
        self._to_abort: set[int] = set()
        self._offer: Negotiate | None = None
        self._own_options: SessionOptions | None = None
        self._released = False

    # --- negotiation ---------------------------------------------------------------------

    async def negotiate(self, offer: Negotiate, ctx: Context) -> Outcome:
        """Connect to every upstream and negotiate ``offer``; run the app's ``negotiate``
        observers."""
        self._offer = offer
        await self._open_links(ctx)
        return await _settle(self._own("negotiate", offer, ctx))

    async def _open_links(self, ctx: Context) -> None:
        assert self._offer is not None
        offer = self._offer

        async def one(at: int, party: UpstreamMilter) -> None:
            try:
                self._links[at], _ = await party.connect(offer)
            except UpstreamFailure as failure:
                self._failed(at, failure, ctx, counted=True)

        await asyncio.gather(
            *(one(at, party) for at, party in enumerate(self.parties) if party is not None)
        )

    def combined(self, reply: NegotiationReply) -> NegotiationReply:
        """The reply for the MTA, given the app's own ``reply`` to its offer."""
        assert self._offer is not None
        self._own_options = session_options(self._offer, reply)
        replies = [reply]
        for link in self._links:
            if link is not None:
                upstream = link.reply
                replies.append(
                    upstream.model_copy(update={"protocol": upstream.protocol | _BUFFERED})
                )
        return combine(self._offer, replies).reply

    # --- commands ------------------------------------------------------------------------

    def dispatch(
        self, name: str, event: Event, ctx: Context
    ) -> Outcome | Coroutine[Any, Any, Outcome]:
        """The chain's outcome for the MTA's ``event`` (stage ``name``)."""
        if name in _ENVELOPE:
            return self._command(name, event, ctx)
        if name in _CONTENT:
            return self._content(name, event, ctx)
        if name == "eom":
            return self._end_of_message(event, ctx)
        if name == "abort":
            self.referee.message_aborted()
            self._message_over()
        elif name == "close":
            return self._close(event, ctx)
        return self._own(name, event, ctx)

    async def _command(self, name: str, event: Event, ctx: Context) -> Outcome:
        if self._released:  # a new session on a reused MTA connection (QUIT_NC)
            await self._reopen(ctx)
        if name == "envfrom":
            await self._send_aborts()
        refused = name == "envrcpt" and ctx.macros.get("rcpt_mailer") == "error"
        referee = self.referee
        for at in referee.asks(name):
            party = self.parties[at]
            if party is None:
                own = self._own_options
                mine = for_party(event, own, refused_by_mta=refused) if own else event
                verdict = None if mine is None else await _settle(self._own(name, mine, ctx))
            elif party.when_at == name and not self._applies(party, ctx):
                self._stop(at, name)
                continue
            else:
                verdict = await self._ask(at, name, event, ctx, refused)
            if referee.hears(name, at, verdict):
                break
        return self._verdict(name)

    def _applies(self, party: UpstreamMilter, ctx: Context) -> bool:
        if party.when is None:
            return True
        try:
            return bool(party.when(ctx))
        except Exception as exc:
            ctx.log.error("condition_failed", upstream=party.name, exc_info=exc)
            return True

    def _stop(self, at: int, stage: str) -> None:
        """A condition says party ``at`` does not apply from ``stage`` on."""
        if stage in _CONNECTION_STAGES:
            self.referee.drop(at)
        else:
            self.referee.drop_from_message(at)

    async def _ask(
        self, at: int, name: str, event: Event, ctx: Context, refused: bool
    ) -> Verdict | Shutdown | None:
        sticky = self._sticky.get(at)
        if sticky is not None:
            return sticky
        link = self._links[at]
        if link is None:
            return None
        forwarded = for_party(event, link.options, refused_by_mta=refused)
        if forwarded is None and not link.declined(event):
            return None  # a recipient the MTA refused, which it did not ask to see
        try:
            answer = await link.send(forwarded or event, macros=self._macros(link, event, ctx))
        except (UpstreamFailure, LocalProtocolError) as exc:
            return self._failed(at, exc, ctx)
        if name == "envfrom":
            self._in_message.add(at)
        return None if answer is None else answer.verdict

    def _macros(
        self, link: UpstreamConnection, event: Event, ctx: Context, letter: str | None = None
    ) -> Macros | None:
        """The macros the MTA sent for ``event``'s command, as many as ``link`` asked for."""
        letter = letter or event.command.decode("latin-1")
        table = ctx.macros
        values = table.stage(letter) if isinstance(table, MacroTable) else {}
        if not values:
            return None
        stage = _MACRO_STAGES.get(letter)
        if stage is not None:
            values = macros_for(link.reply, stage, dict(values))
        return Macros(stage=letter, values={_braced(k): v for k, v in values.items()})

    def _content(
        self, name: str, event: Event, ctx: Context
    ) -> Outcome | Coroutine[Any, Any, Outcome]:
        at = self._own_at
        if at is None or at not in self.referee.asks(name):
            return None
        own = self._own_options
        mine = for_party(event, own) if own is not None else event
        if mine is None:
            return None
        result = self._own(name, mine, ctx)
        if not decided(result):
            return self._content_later(name, at, result)
        return self._content_verdict(name, at, result)

    async def _content_later(
        self, name: str, at: int, result: Coroutine[Any, Any, Outcome]
    ) -> Outcome:
        return self._content_verdict(name, at, await result)

    def _content_verdict(self, name: str, at: int, verdict: Outcome) -> Outcome:
        if self.referee.hears(name, at, verdict):
            return self._verdict(name)
        if any(other != at for other in self.referee.asks("eom")):
            return None  # upstreams still take part: they are given the content later
        return self._verdict(name)

    def _verdict(self, stage: str) -> Verdict | Shutdown:
        """The referee's reply for ``stage``; the upstreams of an ended message are aborted
        before the next one."""
        reply = self.referee.reply(stage)
        if BY_NAME[stage].scope == "message" and (
            stage == "eom"
            or isinstance(reply, Discard | Accept)
            or (isinstance(reply, Reject | TempFail | Shutdown) and stage != "envrcpt")
        ):
            self._message_over()
        return reply

    def _message_over(self) -> None:
        self._to_abort |= self._in_message
        self._in_message.clear()

    async def _send_aborts(self) -> None:
        """Abort, before a new message, the upstreams left inside the last one."""
        to_abort, self._to_abort = self._to_abort, set()
        for at in sorted(to_abort):
            link = self._links[at]
            if link is not None and at not in self._sticky:
                try:
                    await link.abort()
                except UpstreamFailure as failure:
                    self._failed(at, failure, None)

    # --- failures ------------------------------------------------------------------------

    def _failed(
        self, at: int, exc: MilterError, ctx: Context | None, *, counted: bool = False
    ) -> Verdict | None:
        """Apply party ``at``'s failure policy; the reply it gives from now on (None: it is
        dropped)."""
        party = self.parties[at]
        assert party is not None
        failure = exc
        if not isinstance(exc, UpstreamFailure):  # a command it could not be sent: our side
            failure = UpstreamFailure(party.name, "protocol", str(exc))
        assert isinstance(failure, UpstreamFailure)
        if not counted:
            party.failed(failure)
        link, self._links[at] = self._links[at], None
        if link is not None:
            link.abandon()
        self._in_message.discard(at)
        policy = party.options.on_failure
        if ctx is not None:
            ctx.log.warning(
                "upstream_failed",
                upstream=party.name,
                kind=failure.kind,
                error=failure.detail,
                policy=policy,
                retry_in=round(party.retry_in(), 1),
            )
            if ctx.count_upstream_failure is not None:
                ctx.count_upstream_failure(party.name, failure.kind)
        if policy == "accept":
            self.referee.drop(at)
            return None
        verdict: Verdict = TempFail() if policy == "tempfail" else Reject()
        self._sticky[at] = verdict
        return verdict

    # --- end of message ------------------------------------------------------------------

    def _rules(self, ctx: Context) -> HeaderRules:
        # Postfix names itself in macro v, which it sends by default (milter_connect_macros);
        # Sendmail sends no v by default.
        return POSTFIX_RULES if "Postfix" in (ctx.macros.get("v") or "") else SENDMAIL_RULES

    async def _end_of_message(self, event: Event, ctx: Context) -> Outcome:
        message = ctx.message
        options = ctx.options
        edits = MessageEdits(
            message.header_events,
            message.body(),
            self._rules(ctx),
            bool(options is not None and options.leading_space),
        )
        handed_over = False
        try:
            for at in self.referee.asks("eom"):
                party = self.parties[at]
                modifications: list[Modification] = []
                if party is None:
                    verdict = await _settle(self._own("eom", event, ctx))
                    modifications = list(ctx.take_modifications(_WHOLE))
                    leading = bool(self._own_options and self._own_options.leading_space)
                else:
                    link = self._links[at]
                    leading = link is not None and link.options.leading_space
                    verdict, modifications = await self._replay(at, edits, ctx)
                if self.referee.hears("eom", at, verdict):
                    break
                if modifications:
                    edits.take(modifications, leading_space=leading)
            reply = self._verdict("eom")
            if isinstance(reply, Continue | Accept):
                handed_over = self._hand_over(edits, ctx)
                if not handed_over and edits.body_replaced:
                    return TempFail()
            return reply
        finally:
            if not handed_over:
                edits.close()

    async def _replay(
        self, at: int, edits: MessageEdits, ctx: Context
    ) -> tuple[Verdict | Shutdown | None, list[Modification]]:
        """Give upstream ``at`` the message as edited so far; its verdict and edits."""
        sticky = self._sticky.get(at)
        link = self._links[at]
        if sticky is not None or link is None:
            return sticky, []
        options = link.options
        leading = options.leading_space
        try:
            if not options.suppressed("header"):
                for name, value in edits.visible_headers():
                    header = Header(
                        name=name, value=" " + value if leading else value, leading_space=leading
                    )
                    answer = await link.send(header, macros=self._macros(link, header, ctx))
                    if answer is not None and _ends_party(answer.verdict):
                        return answer.verdict, []
            if not options.suppressed("eoh"):
                eoh = EndOfHeaders()
                answer = await link.send(eoh, macros=self._macros(link, eoh, ctx))
                if answer is not None and _ends_party(answer.verdict):
                    return answer.verdict, []
            if not options.suppressed("body"):
                body = edits.rewind_body()
                while chunk := body.read(options.max_data_size):
                    answer = await link.send(Body(chunk=chunk))
                    verdict = None if answer is None else answer.verdict
                    if isinstance(verdict, Skip):
                        break
                    if _ends_party(verdict):
                        return verdict, []
            eom = EndOfMessage()
            answer = await link.send(eom, macros=self._macros(link, eom, ctx))
        except (UpstreamFailure, LocalProtocolError) as exc:
            return self._failed(at, exc, ctx), []
        self._in_message.discard(at)
        assert answer is not None  # end of message is always answered
        return answer.verdict, answer.modifications

    def _hand_over(self, edits: MessageEdits, ctx: Context) -> bool:
        """Queue the chain's edits for the MTA, in order; False when that failed (logged)."""
        out, body, quarantine = edits.for_mta()
        try:
            for modification in out:
                ctx.queue(modification)
            if body is not None:
                ctx.replace_body(body)
            if quarantine is not None:
                ctx.queue(quarantine)
        except MilterError as exc:
            ctx.log.error("modification_failed", error=str(exc))
            list(ctx.take_modifications())  # none of them: the MTA gets the fallback
            return False
        return True

    # --- the end ---------------------------------------------------------------------------

    async def _close(self, event: Event, ctx: Context) -> Outcome:
        try:
            return await _settle(self._own("close", event, ctx))
        finally:
            await self.release()

    async def release(self) -> None:
        """The MTA's session is over: give every upstream connection back (kept for reuse
        where it can be), or close it."""
        assert self._offer is not None or not any(self._links)
        offer = self._offer
        links, self._links = self._links, [None] * len(self.parties)
        to_abort = self._to_abort | self._in_message
        self._to_abort, self._in_message = set(), set()
        self._released = True

        async def give_back(at: int, link: UpstreamConnection) -> None:
            party = self.parties[at]
            assert party is not None
            assert offer is not None
            if at in to_abort:
                try:
                    await link.abort()
                except UpstreamFailure:
                    return
            await party.release(link, offer)

        await asyncio.gather(
            *(give_back(at, link) for at, link in enumerate(links) if link is not None)
        )

    async def _reopen(self, ctx: Context) -> None:
        """Start a new session of the MTA's connection (after QUIT_NC) with fresh upstream
        sessions."""
        self._released = False
        self.referee = Referee(self._names)
        self._sticky.clear()
        await self._open_links(ctx)
