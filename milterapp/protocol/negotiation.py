"""Option negotiation as pure functions.

:func:`negotiate` turns the MTA's offer and the application's :class:`Requirements` into
the reply to send; :func:`session_options` checks a reply against an offer and says what the
session will then look like (which commands come, which need replies, the packet size).
"""

from __future__ import annotations

from typing import Final, Literal, TypeAlias

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator

from milterapp.errors import LocalProtocolError, NegotiationError
from milterapp.events import Negotiate
from milterapp.protocol.constants import (
    DEFAULT_MAX_DATA_SIZE,
    MAX_DATA_SIZE_1M,
    MAX_DATA_SIZE_256K,
    MAX_VERSION,
    MIN_VERSION,
    ActionFlag,
    Command,
    MacroStage,
    ProtocolFlag,
    max_data_size_for,
)
from milterapp.replies import NegotiationReply

__all__ = [
    "OPTIONAL_EVENTS",
    "OptionalEvent",
    "Requirements",
    "SessionOptions",
    "negotiate",
    "session_options",
]

#: Events the MTA can be asked not to send (end of message, abort and quit always come).
OptionalEvent: TypeAlias = Literal[
    "connect", "helo", "envfrom", "envrcpt", "data", "unknown", "header", "eoh", "body"
]

# event -> (command byte, flag that suppresses it, flag that makes it reply-less, first version)
_EVENT_FLAGS: Final[dict[str, tuple[bytes, ProtocolFlag, ProtocolFlag, int]]] = {
    "connect": (Command.CONNECT.value, ProtocolFlag.NOCONNECT, ProtocolFlag.NR_CONN, 2),
    "helo": (Command.HELO.value, ProtocolFlag.NOHELO, ProtocolFlag.NR_HELO, 2),
    "envfrom": (Command.MAIL.value, ProtocolFlag.NOMAIL, ProtocolFlag.NR_MAIL, 2),
    "envrcpt": (Command.RCPT.value, ProtocolFlag.NORCPT, ProtocolFlag.NR_RCPT, 2),
    "data": (Command.DATA.value, ProtocolFlag.NODATA, ProtocolFlag.NR_DATA, 4),
    "unknown": (Command.UNKNOWN.value, ProtocolFlag.NOUNKNOWN, ProtocolFlag.NR_UNKN, 3),
    "header": (Command.HEADER.value, ProtocolFlag.NOHDRS, ProtocolFlag.NR_HDR, 2),
    "eoh": (Command.EOH.value, ProtocolFlag.NOEOH, ProtocolFlag.NR_EOH, 2),
    "body": (Command.BODY.value, ProtocolFlag.NOBODY, ProtocolFlag.NR_BODY, 2),
}
OPTIONAL_EVENTS: Final[frozenset[OptionalEvent]] = frozenset(
    ("connect", "helo", "envfrom", "envrcpt", "data", "unknown", "header", "eoh", "body")
)
_MDS_BITS: Final = ProtocolFlag.MDS_256K | ProtocolFlag.MDS_1M
_ALWAYS_REPLY: Final = frozenset({Command.OPTNEG.value[0], Command.BODYEOB.value[0]})


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

    _no_reply: frozenset[int] = PrivateAttr(default=frozenset())
    _suppressed: frozenset[str] = PrivateAttr(default=frozenset())

    def model_post_init(self, context: object, /) -> None:
        # Computed once: the per-message path asks, and IntFlag's & runs in Python.
        self._no_reply = frozenset(
            command[0] for command, _, nr, _ in _EVENT_FLAGS.values() if self.protocol & nr
        )
        self._suppressed = frozenset(
            event
            for event, (_, no_flag, _, first_version) in _EVENT_FLAGS.items()
            if self.protocol & no_flag or self.version < first_version
        )

    def reply_expected(self, command: int) -> bool:
        """Whether the MTA waits for a reply to the command with byte ``command``."""
        if command in _ALWAYS_REPLY:
            return True
        if command in _NEVER_REPLY:
            return False
        return command not in self._no_reply

    def suppressed(self, event: OptionalEvent) -> bool:
        """Whether the MTA was asked not to send ``event`` (or cannot at this version)."""
        if event not in _EVENT_FLAGS:
            raise KeyError(event)
        return event in self._suppressed

    @property
    def leading_space(self) -> bool:
        """Header values keep their leading whitespace (HDR_LEADSPC)."""
        return bool(self.protocol & ProtocolFlag.HDR_LEADSPC)

    @property
    def skip(self) -> bool:
        """The milter may answer a body chunk with Skip."""
        return bool(self.protocol & ProtocolFlag.SKIP)


_NEVER_REPLY: Final = frozenset(
    c.value[0] for c in (Command.MACRO, Command.ABORT, Command.QUIT, Command.QUIT_NC)
)


def _names(flags: ActionFlag | ProtocolFlag) -> list[str]:
    return [
        flag.name
        for flag in type(flags)
        if flag in flags and flag.name and flag.value.bit_count() == 1
    ]


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
    for event, (_, no_flag, nr_flag, _) in _EVENT_FLAGS.items():
        if event not in needs.events:
            protocol |= no_flag
        if event not in needs.events or event in needs.no_reply:
            protocol |= nr_flag
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
    offered_actions, offered_protocol = _offered(offer)
    if not MIN_VERSION <= reply.version <= offer.version:
        raise LocalProtocolError(
            f"negotiation reply version {reply.version} is outside {MIN_VERSION}.."
            f"{offer.version} (what the MTA offered)",
            command="O",
        )
    extra_actions = reply.actions & ~offered_actions
    if extra_actions:
        raise LocalProtocolError(
            f"negotiation reply asks for actions not offered: {', '.join(_names(extra_actions))}",
            command="O",
        )
    extra_protocol = reply.protocol & ~offered_protocol
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
