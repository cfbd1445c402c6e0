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
from milterapp.chain.options import UpstreamFailure
from milterapp.chain.party import UpstreamMilter
from milterapp.chain.referee import Referee
from milterapp.chain.upstream import UpstreamConnection
from milterapp.constants import MacroStage, ProtocolFlag
from milterapp.context import Context
from milterapp.errors import LocalProtocolError, MilterError
from milterapp.events import (
    Body,
    EndOfHeaders,
    EndOfMessage,
    Event,
    Header,
    Helo,
    Negotiate,
    encode_text,
)
from milterapp.protocol.macros import MacroTable
from milterapp.protocol.negotiation import SessionOptions, session_options
from milterapp.protocol.payload import cstrings
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
#: The envelope stages in the order the MTA sends them.
_ORDER: Final = {
    name: at for at, name in enumerate(("connect", "helo", "envfrom", "envrcpt", "data"))
}
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
#: The commands of a message's content, as replayed to an upstream.
_HEADER, _EOH, _BODY, _EOM = (event.command for event in (Header, EndOfHeaders, Body, EndOfMessage))
_ENDS_PARTY: Final[tuple[type[object], ...]] = (*RESTRICTIVE, Accept)
#: Enough for the app's own replacement body in one piece (the MTA's limit applies later).
_WHOLE: Final = 1 << 62


async def _settle(result: Outcome | Coroutine[Any, Any, Outcome]) -> Outcome:
    if decided(result):
        return result
    return await result


def _helo_of(ctx: Context) -> Helo | None:
    name = ctx.helo
    return None if name is None else Helo(name=name)


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
        self._reconnect: set[int] = set()  # upstreams to connect again before their next command
        self._offer: Negotiate | None = None
        #: By upstream connection, the macro stages at which it is given the MTA's packet
        #: whole: it asked for every macro there, or for exactly what the MTA was asked for.
        self._whole: dict[UpstreamConnection, frozenset[MacroStage]] = {}
        self._own_options: SessionOptions | None = None
        self._rcpt_rej = False
        self._rules: HeaderRules | None = None  # the MTA's, known at the first end of message
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
                self._links[at] = await party.connect(offer)
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
        combined = combine(self._offer, replies).reply
        self._rcpt_rej = bool(combined.protocol & ProtocolFlag.RCPT_REJ)
        asked = combined.macros
        self._whole = {
            link: frozenset(
                stage
                for stage in MacroStage
                if stage not in link.reply.macros or link.reply.macros[stage] == asked.get(stage)
            )
            for link in self._links
            if link is not None
        }
        if self._sticky:
            # An upstream failed already and its policy refuses: the MTA must let us say so
            # where it answers (CONNECT, or its condition's stage), a command the MTA would
            # otherwise send without waiting, or not at all.
            unwanted = ProtocolFlag.NONE
            for at in self._sticky:
                party = self.parties[at]
                assert party is not None
                stage = BY_NAME[party.when_at if party.when is not None else "connect"]
                unwanted |= stage.suppress | stage.no_reply
            combined = combined.model_copy(update={"protocol": combined.protocol & ~unwanted})
        return combined

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
        if name == "envfrom" and self._to_abort:
            await self._send_aborts()
        if self._reconnect:
            await self._reconnect_links(ctx)
        # With RCPT_REJ the MTA also shows the recipients it refused, marked so.
        refused = self._rcpt_rej and name == "envrcpt" and ctx.macros.get("rcpt_mailer") == "error"
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

    def _condition_ahead(self, at: int, stage: str) -> bool:
        """Whether party ``at`` has a condition asked at a later stage than ``stage``: its
        failure answers only once the condition says that it applies."""
        party = self.parties[at]
        return (
            party is not None
            and party.when is not None
            and _ORDER.get(stage, 0) < _ORDER[party.when_at]
        )

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
            return None if self._condition_ahead(at, name) else sticky
        link = self._links[at]
        if link is None:
            return None
        forwarded = for_party(event, link.options, refused_by_mta=refused)
        if forwarded is None and not link.declined(event):
            return None  # a recipient the MTA refused, which it did not ask to see
        try:
            answer = await link.send(
                forwarded or event, macros=self._macros(link, event.command, ctx)
            )
        except (UpstreamFailure, LocalProtocolError) as exc:
            return self._failed(at, exc, ctx)
        if name == "envfrom":
            self._in_message.add(at)
        return None if answer is None else answer.verdict

    def _macros(self, link: UpstreamConnection, command: bytes, ctx: Context) -> bytes | None:
        """The ``D`` packet payload before ``command`` (its byte): the macros the MTA sent
        for it, as many as ``link`` asked for."""
        letter = command.decode("latin-1")
        table = ctx.macros
        if not isinstance(table, MacroTable):
            return None
        stage = _MACRO_STAGES.get(letter)
        if stage is None or stage in self._whole.get(link, ()):
            return table.packet(letter)  # what the MTA sent is what it asked for
        values = table.stage(letter)
        if not values:
            return None
        values = macros_for(link.reply, stage, dict(values))
        pairs = (part for name, value in values.items() for part in (_braced(name), value))
        return letter.encode("latin-1") + cstrings(*pairs)

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

    async def _reconnect_links(self, ctx: Context) -> None:
        """Connect again to the upstreams whose connection was given up after an early
        verdict, and bring each to where the MTA's session is: CONNECT and HELO again."""
        assert self._offer is not None
        reconnect, self._reconnect = self._reconnect, set()
        for at in sorted(reconnect):
            party = self.parties[at]
            assert party is not None
            try:
                link = await party.connect(self._offer)
                self._links[at] = link
                verdict: Outcome = None
                for event in (ctx.client if ctx.client_known else None, _helo_of(ctx)):
                    if event is None:
                        continue
                    answer = await link.send(event, macros=self._macros(link, event.command, ctx))
                    verdict = None if answer is None else answer.verdict
                    if verdict is not None and not isinstance(verdict, Continue):
                        break
            except (UpstreamFailure, LocalProtocolError) as exc:
                self._failed(at, exc, ctx)
                continue
            if isinstance(verdict, Accept):
                self.referee.drop(at)
            elif isinstance(verdict, Reject | TempFail | Shutdown):
                self._sticky[at] = verdict if not isinstance(verdict, Shutdown) else TempFail()

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

    def _header_rules(self, ctx: Context) -> HeaderRules:
        rules = self._rules
        if rules is None:
            # Postfix names itself in macro v, which it sends by default (with the connect
            # macros); Sendmail sends no v by default.
            postfix = "Postfix" in (ctx.macros.get("v") or "")
            rules = self._rules = POSTFIX_RULES if postfix else SENDMAIL_RULES
        return rules

    async def _end_of_message(self, event: Event, ctx: Context) -> Outcome:
        message = ctx.message
        options = ctx.options
        edits = MessageEdits(
            message.header_records,
            message.body(),
            self._header_rules(ctx),
            bool(options is not None and options.leading_space),
        )
        handed_over = False
        try:
            asks = self.referee.asks("eom")
            for index, at in enumerate(asks):
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
                    # (Header edits are applied to the model only for an upstream after it.)
                    later = any(self.parties[then] is not None for then in asks[index + 1 :])
                    edits.take(modifications, leading_space=leading, shown_later=later)
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
        packets: list[tuple[bytes, bytes, bytes | None]] = []
        if not options.suppressed("header"):
            macros = self._macros(link, _HEADER, ctx)
            payloads = edits.header_payloads(leading)
            if payloads is None:
                space = b" " if leading else b""
                payloads = [
                    encode_text(name) + b"\0" + space + encode_text(value) + b"\0"
                    for name, value in edits.visible_headers()
                ]
            packets.extend((_HEADER, payload, macros) for payload in payloads)
        packets.append((_EOH, b"", self._macros(link, _EOH, ctx)))
        rest: list[tuple[bytes, bytes, bytes | None]] = []
        if not options.suppressed("body"):
            body = edits.rewind_body()
            macros = self._macros(link, _BODY, ctx)
            while chunk := body.read(options.max_data_size):
                (rest if packets[-1][0] == _BODY else packets).append((_BODY, chunk, macros))
        eom = (_EOM, b"", self._macros(link, _EOM, ctx))
        try:
            if rest:
                # A long body: the headers and the first chunk first, so that an upstream
                # that skips the body (at its first chunk, as milters do) is not sent the rest.
                answer, complete = await link.pipeline(packets)
                if complete and not _ends_party(answer.verdict):
                    skipped = isinstance(answer.verdict, Skip)
                    answer, complete = await link.pipeline([eom] if skipped else [*rest, eom])
            else:
                answer, complete = await link.pipeline([*packets, eom])
        except (UpstreamFailure, LocalProtocolError) as exc:
            return self._failed(at, exc, ctx), []
        self._in_message.discard(at)
        if not complete:
            # It decided before the end and was sent the rest: a new connection is opened
            # for it at the next command.
            self._links[at] = None
            self._reconnect.add(at)
            return answer.verdict, []
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
