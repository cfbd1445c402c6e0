"""Option negotiation as pure functions.

:func:`negotiate` turns the MTA's offer and the application's :class:`Requirements` into
the reply to send; :func:`session_options` checks a reply against an offer and says what the
session will then look like (which commands come, which need replies, the packet size).
"""

from __future__ import annotations

from functools import cached_property
from typing import Final, Literal, cast

from pydantic import BaseModel, ConfigDict, Field, field_validator

from milterapp.constants import (
    DEFAULT_MAX_DATA_SIZE,
    MAX_DATA_SIZE_1M,
    MAX_DATA_SIZE_256K,
    MAX_VERSION,
    MIN_VERSION,
    ActionFlag,
    MacroStage,
    ProtocolFlag,
    max_data_size_for,
)
from milterapp.errors import LocalProtocolError, NegotiationError
from milterapp.events import Negotiate
from milterapp.protocol.stages import STAGES, OptionalEvent
from milterapp.replies import NegotiationReply

__all__ = [
    "OPTIONAL_EVENTS",
    "UNNEGOTIATED",
    "Requirements",
    "SessionOptions",
    "negotiate",
    "session_options",
]

_OPTIONAL_STAGES: Final = tuple(stage for stage in STAGES if stage.optional)
#: Events the MTA can be asked not to send (end of message, abort and quit always come).
OPTIONAL_EVENTS: Final[frozenset[OptionalEvent]] = frozenset(
    cast(OptionalEvent, stage.name) for stage in _OPTIONAL_STAGES
)
#: Commands the MTA waits for a reply to, unless negotiated otherwise (``Stage.no_reply``).
_REPLIED: Final = frozenset(
    command for stage in STAGES if stage.replies for command in stage.commands
)
#: Session options already computed, by offer and reply (see :func:`session_options`).
_SESSIONS: dict[tuple[int, ...], SessionOptions] = {}
_SESSIONS_KEPT: Final = 64


class Requirements(BaseModel):
    """What an application needs from the MTA; the input of :func:`negotiate`.

    Attributes:
        events: events it handles; the MTA is asked not to send the others.
        no_reply: handled events whose replies never change the verdict; the MTA is asked
            not to wait for a reply to them (and to events that are not handled).
        actions: actions it may use; those the MTA offers are requested.
        required_actions: actions without which it cannot work (negotiation fails).
        required_protocol: protocol features without which it cannot work (``SKIP``,
            ``RCPT_REJ``, ``HDR_LEADSPC``, an ``NR_*`` flag...).
        macros: macro names to ask for, per stage (needs SETSYMLIST, protocol version 6).
        leading_space: header values with their leading whitespace (HDR_LEADSPC).
        rejected_recipients: also see recipients the MTA rejected (RCPT_REJ).
        skip: may answer a body chunk with Skip (SKIP).
        max_data_size: largest packet payload it accepts, if the MTA offers more than 64 KiB.
        version: highest protocol version to speak.
        undecoded: asked-for events that it only keeps, read by nobody as they come: the
            server hands them on undecoded (the context decodes one when it is read).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    events: frozenset[OptionalEvent] = OPTIONAL_EVENTS
    no_reply: frozenset[OptionalEvent] = frozenset()
    actions: ActionFlag = ActionFlag.ALL & ~ActionFlag.SETSYMLIST
    required_actions: ActionFlag = ActionFlag.NONE
    required_protocol: ProtocolFlag = ProtocolFlag.NONE
    macros: dict[MacroStage, tuple[str, ...]] = Field(default_factory=dict)
    leading_space: bool = False
    rejected_recipients: bool = False
    skip: bool = True
    max_data_size: Literal[65535, 262143, 1048575] = DEFAULT_MAX_DATA_SIZE
    version: int = Field(default=MAX_VERSION, ge=MIN_VERSION, le=MAX_VERSION)
    undecoded: frozenset[OptionalEvent] = frozenset()

    @cached_property
    def undecoded_commands(self) -> frozenset[int]:
        """The command bytes of :attr:`undecoded`."""
        return frozenset(
            command
            for stage in _OPTIONAL_STAGES
            if stage.name in self.undecoded
            for command in stage.commands
        )

    @field_validator("macros")
    @classmethod
    def _check_macros(
        cls, value: dict[MacroStage, tuple[str, ...]]
    ) -> dict[MacroStage, tuple[str, ...]]:
        NegotiationReply(macros=value)  # one place validates macro names
        return value


class SessionOptions(BaseModel):
    """What was agreed for one connection: version, actions, protocol flags, packet size."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    version: int
    actions: ActionFlag
    protocol: ProtocolFlag
    max_data_size: int = DEFAULT_MAX_DATA_SIZE

    # Computed when first asked, then kept in the instance (pydantic's private attributes
    # cost a slow __getattr__ on every read): the per-message path asks, and IntFlag's &
    # runs in Python. session_options() hands out one instance per negotiation outcome.
    @cached_property
    def replied_commands(self) -> frozenset[int]:
        """The command bytes the MTA waits for a reply to."""
        protocol = int(self.protocol)
        return _REPLIED - {
            command
            for stage in _OPTIONAL_STAGES
            if protocol & stage.no_reply
            for command in stage.commands
        }

    @cached_property
    def suppressed_events(self) -> frozenset[str]:
        """The names of the events the MTA does not send (asked not to, or too old)."""
        protocol = int(self.protocol)
        return frozenset(
            stage.name
            for stage in _OPTIONAL_STAGES
            if protocol & stage.suppress or self.version < stage.since
        )

    def reply_expected(self, command: int) -> bool:
        """Whether the MTA waits for a reply to the command with byte ``command``."""
        return command in self.replied_commands

    def suppressed(self, event: OptionalEvent) -> bool:
        """Whether the MTA was asked not to send ``event`` (or cannot at this version)."""
        if event not in OPTIONAL_EVENTS:
            raise KeyError(event)
        return event in self.suppressed_events

    @cached_property
    def leading_space(self) -> bool:
        """Header values keep their leading whitespace (HDR_LEADSPC)."""
        return bool(self.protocol & ProtocolFlag.HDR_LEADSPC)

    @property
    def skip(self) -> bool:
        """The milter may answer a body chunk with Skip."""
        return bool(self.protocol & ProtocolFlag.SKIP)


#: What holds before negotiation: every stage is sent, and every command that can get a
#: reply waits for one.
UNNEGOTIATED: Final = SessionOptions(
    version=MAX_VERSION, actions=ActionFlag.NONE, protocol=ProtocolFlag.NONE
)


def _names(flags: ActionFlag | ProtocolFlag) -> list[str]:
    names = [
        flag.name
        for flag in type(flags)
        if flag in flags and flag.name and flag.value.bit_count() == 1
    ]
    unnamed = int(flags) & ~int(type(flags).ALL)
    return names + ([f"0x{unnamed:x}"] if unnamed else [])


def _offered(offer: Negotiate) -> tuple[ActionFlag, ProtocolFlag]:
    # libmilter reads zero as "the version 1 defaults".
    return offer.actions or ActionFlag.V1, offer.protocol or ProtocolFlag.V1


def _data_size(offered: ProtocolFlag, wanted: int) -> tuple[ProtocolFlag, int]:
    for bit, size in (
        (ProtocolFlag.MDS_1M, MAX_DATA_SIZE_1M),
        (ProtocolFlag.MDS_256K, MAX_DATA_SIZE_256K),
    ):
        if offered & bit and size <= wanted:
            return bit, size
    return ProtocolFlag.NONE, DEFAULT_MAX_DATA_SIZE


def negotiate(offer: Negotiate, needs: Requirements) -> NegotiationReply:
    """Compute the negotiation reply for ``offer``.

    Unhandled events are suppressed and made reply-less where the MTA allows it; events the
    MTA cannot suppress still come and must be answered (with Continue). Features the MTA
    does not offer are left out unless required.

    Raises:
        NegotiationError: the version is below 2, or a required action or protocol feature
            is not offered; ``missing`` names the flags.
    """
    if offer.version < MIN_VERSION:
        raise NegotiationError(
            f"MTA offers protocol version {offer.version}; milterapp needs {MIN_VERSION} or "
            "later (Postfix: set milter_protocol to 6)",
            missing=["version"],
        )
    offered_actions, offered_protocol = _offered(offer)
    _require(needs.required_actions & ~offered_actions, "action")
    _require(needs.required_protocol & ~offered_protocol, "protocol feature")

    actions = (needs.actions | needs.required_actions) & offered_actions
    macros = needs.macros if offered_actions & ActionFlag.SETSYMLIST else {}
    if MacroStage.EOM in macros and MacroStage.EOH not in macros:
        # Sendmail uses a milter's end-of-message list only if it also sent an end-of-header
        # list (milter.c picks the EOM list by the EOH flag; seen with Sendmail 8.17).
        macros = {**macros, MacroStage.EOH: ()}
    if macros:
        actions |= ActionFlag.SETSYMLIST

    protocol = ProtocolFlag.NONE
    for stage in _OPTIONAL_STAGES:
        if stage.name not in needs.events:
            protocol |= stage.suppress
        if stage.name not in needs.events or stage.name in needs.no_reply:
            protocol |= stage.no_reply
    if needs.skip:
        protocol |= ProtocolFlag.SKIP
    if needs.rejected_recipients:
        protocol |= ProtocolFlag.RCPT_REJ
    if needs.leading_space:
        protocol |= ProtocolFlag.HDR_LEADSPC
    protocol |= needs.required_protocol
    mds_bit, _ = _data_size(offered_protocol, needs.max_data_size)
    # Request only what is offered: Sendmail refuses a protocol mask that is not a subset.
    protocol = (protocol & offered_protocol & ~ProtocolFlag.INTERNAL) | mds_bit
    return NegotiationReply(
        version=min(offer.version, needs.version),
        actions=actions,
        protocol=protocol,
        macros=macros,
    )


def _require(missing: ActionFlag | ProtocolFlag, kind: str) -> None:
    if missing:
        names = _names(missing)
        raise NegotiationError(
            f"the MTA does not offer the required {kind} {', '.join(names)}", missing=names
        )


def session_options(offer: Negotiate, reply: NegotiationReply) -> SessionOptions:
    """Check ``reply`` against ``offer`` and return the options the session runs with.

    Raises:
        LocalProtocolError: the reply asks for a higher version, or for actions or protocol
            flags the MTA did not offer (the MTA would drop the milter).
    """
    # Every connection from one MTA negotiates alike: the options are computed once.
    key = (
        offer.version,
        int(offer.actions),
        int(offer.protocol),
        reply.version,
        int(reply.actions),
        int(reply.protocol),
    )
    known = _SESSIONS.get(key)
    if known is None:
        known = _check_reply(offer, reply)
        if len(_SESSIONS) >= _SESSIONS_KEPT:
            _SESSIONS.clear()
        _SESSIONS[key] = known
    return known


def _check_reply(offer: Negotiate, reply: NegotiationReply) -> SessionOptions:
    offered_actions, offered_protocol = _offered(offer)
    if not MIN_VERSION <= reply.version <= offer.version:
        raise LocalProtocolError(
            f"negotiation reply version {reply.version} is outside {MIN_VERSION}.."
            f"{offer.version} (what the MTA offered)",
            command="O",
        )
    # In ints: an IntFlag's complement has no bits outside its members, so bits the
    # protocol does not name would pass unseen.
    extra_actions = ActionFlag(int(reply.actions) & ~int(offered_actions))
    if extra_actions:
        raise LocalProtocolError(
            f"negotiation reply asks for actions not offered: {', '.join(_names(extra_actions))}",
            command="O",
        )
    extra_protocol = ProtocolFlag(int(reply.protocol) & ~int(offered_protocol))
    if extra_protocol:
        raise LocalProtocolError(
            "negotiation reply asks for protocol flags not offered: "
            f"{', '.join(_names(extra_protocol))}",
            command="O",
        )
    return SessionOptions(
        version=reply.version,
        actions=reply.actions,
        protocol=reply.protocol,
        max_data_size=max_data_size_for(reply.protocol),
    )
