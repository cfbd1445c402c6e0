"""The stages of a milter conversation: one table, and every fact about each stage.

A stage is what an application can handle: an event model, the MTA command that carries it
(if any), the name its handlers are registered under, which replies are legal there, and how
negotiation can leave it out or make it reply-less. Every other place that needs one of these
facts (the state machines of both sides, negotiation, the app's registration and dispatch, the
server's bookkeeping, the testing kit's MTA profiles) derives it from :data:`STAGES`, so that a
stage is described once. The command bytes themselves are the event models' own
(:attr:`milterapp.events.Event.command`). Section numbers refer to docs/protocol-reference.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, Literal, TypeAlias

from milterapp.constants import MacroStage, ProtocolFlag
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
    Negotiate,
    Quit,
    QuitNoClose,
    Unknown,
)
from milterapp.replies import (
    Accept,
    Continue,
    Discard,
    NegotiationReply,
    Reject,
    Reply,
    Shutdown,
    Skip,
    TempFail,
)

__all__ = [
    "BY_COMMAND",
    "BY_EVENT",
    "BY_NAME",
    "MESSAGE_STAGES",
    "SEQUENCE",
    "STAGES",
    "EventName",
    "MacroStageName",
    "OptionalEvent",
    "Scope",
    "Stage",
]

#: What a verdict at a stage can end: the whole connection, or the open message.
Scope: TypeAlias = Literal["connection", "message"]

_CONNECTION_VERDICTS: Final = (Continue, Accept, Reject, TempFail, Shutdown)
_MESSAGE_VERDICTS: Final = (*_CONNECTION_VERDICTS, Discard)
_NONE: Final = ProtocolFlag.NONE


@dataclass(frozen=True, slots=True)
class Stage:
    """Everything milterapp knows about one stage.

    Attributes:
        name: the handler name (``@app.on("envfrom")``).
        events: the event models its handlers receive; the first is the usual one.
        aliases: other names for it (milter-manager's signal names and common spellings).
        macros: the stage a macro list can be asked for in negotiation, if any (§2).
        replies: the final replies legal on the wire in answer to its command (§4); empty
            when the MTA expects no reply at all.
        scope: what a verdict here ends, unless it is one of ``goes_on``: the connection
            (CONNECT, HELO) or the open message (MAIL to end of message); None where a verdict
            ends nothing (unknown commands, and stages without verdicts).
        goes_on: the verdicts after which that scope goes on (at RCPT, a refusal concerns that
            recipient alone; at end of message every verdict ends the message).
        repeats: the command may come several times in a row (RCPT, headers, body chunks).
        observer: handlers only watch; they return None and the reply is not theirs.
        suppress: the negotiation flag that asks the MTA not to send it (NONE: always sent).
        no_reply: the negotiation flag that asks the MTA not to wait for its reply.
        since: the first protocol version whose MTAs send it.
    """

    name: str
    events: tuple[type[Event], ...]
    aliases: tuple[str, ...] = ()
    macros: MacroStage | None = None
    replies: tuple[type[Reply], ...] = ()
    scope: Scope | None = None
    goes_on: tuple[type[Reply], ...] = ()
    repeats: bool = False
    observer: bool = False
    suppress: ProtocolFlag = _NONE
    no_reply: ProtocolFlag = _NONE
    since: int = 2

    @property
    def event(self) -> type[Event]:
        """The event model its handlers usually receive."""
        return self.events[0]

    @property
    def commands(self) -> bytes:
        """The command bytes that carry it (``b""``: no packet does, as for ``open``)."""
        return b"".join(event.command for event in self.events)

    @property
    def optional(self) -> bool:
        """Whether the MTA can be asked not to send it."""
        return self.suppress is not _NONE


#: Every stage, in the order a conversation goes through them (``unknown`` may come at any
#: point after ``connect``; ``abort`` ends a message instead of ``eom``).
STAGES: Final[tuple[Stage, ...]] = (
    Stage("open", (ConnectionOpened,), aliases=("connection-established",), observer=True),
    Stage("negotiate", (Negotiate,), replies=(NegotiationReply,), observer=True),
    Stage(
        "connect",
        (Connect,),
        macros=MacroStage.CONNECT,
        replies=_CONNECTION_VERDICTS,
        scope="connection",
        goes_on=(Continue,),
        suppress=ProtocolFlag.NOCONNECT,
        no_reply=ProtocolFlag.NR_CONN,
    ),
    Stage(
        "helo",
        (Helo,),
        macros=MacroStage.HELO,
        replies=_CONNECTION_VERDICTS,
        scope="connection",
        goes_on=(Continue,),
        suppress=ProtocolFlag.NOHELO,
        no_reply=ProtocolFlag.NR_HELO,
    ),
    Stage(
        "envfrom",
        (EnvFrom,),
        aliases=("envelope-from",),
        macros=MacroStage.ENVFROM,
        replies=_MESSAGE_VERDICTS,
        scope="message",
        goes_on=(Continue,),
        suppress=ProtocolFlag.NOMAIL,
        no_reply=ProtocolFlag.NR_MAIL,
    ),
    Stage(
        "envrcpt",
        (EnvRcpt,),
        aliases=("envelope-recipient",),
        macros=MacroStage.ENVRCPT,
        replies=_MESSAGE_VERDICTS,
        scope="message",
        goes_on=(Continue, Reject, TempFail),
        repeats=True,
        suppress=ProtocolFlag.NORCPT,
        no_reply=ProtocolFlag.NR_RCPT,
    ),
    Stage(
        "data",
        (Data,),
        macros=MacroStage.DATA,
        replies=_MESSAGE_VERDICTS,
        scope="message",
        goes_on=(Continue,),
        suppress=ProtocolFlag.NODATA,
        no_reply=ProtocolFlag.NR_DATA,
        since=4,
    ),
    Stage(
        "unknown",
        (Unknown,),
        replies=_CONNECTION_VERDICTS,
        suppress=ProtocolFlag.NOUNKNOWN,
        no_reply=ProtocolFlag.NR_UNKN,
        since=3,
    ),
    Stage(
        "header",
        (Header,),
        replies=_MESSAGE_VERDICTS,
        scope="message",
        goes_on=(Continue,),
        repeats=True,
        suppress=ProtocolFlag.NOHDRS,
        no_reply=ProtocolFlag.NR_HDR,
    ),
    Stage(
        "eoh",
        (EndOfHeaders,),
        aliases=("end-of-header", "end-of-headers"),
        macros=MacroStage.EOH,
        replies=_MESSAGE_VERDICTS,
        scope="message",
        goes_on=(Continue,),
        suppress=ProtocolFlag.NOEOH,
        no_reply=ProtocolFlag.NR_EOH,
    ),
    Stage(
        "body",
        (Body,),
        replies=(*_MESSAGE_VERDICTS, Skip),
        scope="message",
        goes_on=(Continue, Skip),
        repeats=True,
        suppress=ProtocolFlag.NOBODY,
        no_reply=ProtocolFlag.NR_BODY,
    ),
    Stage(
        "eom",
        (EndOfMessage,),
        aliases=("end-of-message",),
        macros=MacroStage.EOM,
        replies=_MESSAGE_VERDICTS,
        scope="message",
    ),
    Stage("abort", (Abort,), observer=True),
    Stage("close", (Quit, QuitNoClose, ConnectionClosed), aliases=("finished",), observer=True),
)

#: Handler names, in the order of :data:`STAGES` (tests/protocol/test_stages.py checks that
#: the Literals below list what the table does; type checkers need them written out).
EventName: TypeAlias = Literal[
    "open",
    "negotiate",
    "connect",
    "helo",
    "envfrom",
    "envrcpt",
    "data",
    "unknown",
    "header",
    "eoh",
    "body",
    "eom",
    "abort",
    "close",
]
#: Names of the stages the MTA can be asked not to send (``Stage.optional``).
OptionalEvent: TypeAlias = Literal[
    "connect", "helo", "envfrom", "envrcpt", "data", "unknown", "header", "eoh", "body"
]
#: Names of the stages a macro list can be asked for (``Stage.macros``).
MacroStageName: TypeAlias = Literal["connect", "helo", "envfrom", "envrcpt", "data", "eoh", "eom"]

#: Each stage by its name and by each alias.
BY_NAME: Final[Mapping[str, Stage]] = {
    name: stage for stage in STAGES for name in (stage.name, *stage.aliases)
}
#: Each stage by each command byte that carries it.
BY_COMMAND: Final[Mapping[int, Stage]] = {
    command: stage for stage in STAGES for command in stage.commands
}
#: Each stage by each of its event models.
BY_EVENT: Final[Mapping[type[Event], Stage]] = {
    event: stage for stage in STAGES for event in stage.events
}
#: The command letters of the stages that go forward in order, as a transaction does
#: (``CHMRTLNBE``): a command may follow one of an earlier stage, or its own if it repeats.
SEQUENCE: Final = "".join(stage.commands.decode() for stage in STAGES if stage.scope is not None)
#: The stages of a message, in order; the first (MAIL) opens one, the others go on with it.
MESSAGE_STAGES: Final = tuple(stage for stage in STAGES if stage.scope == "message")
