"""Which replies may answer which command (protocol reference §4, §7).

Pure rules, without state: the state machine (:mod:`milterapp.protocol.machine`) applies them
before it sends a reply, and keeps what depends on the conversation so far (the order of
replacement body packets, what a verdict ends).
"""

from __future__ import annotations

from typing import Final

from milterapp.errors import ActionNotNegotiated, LocalProtocolError
from milterapp.protocol.negotiation import SessionOptions
from milterapp.replies import (
    Accept,
    Continue,
    Discard,
    Reject,
    Reply,
    Shutdown,
    Skip,
    TempFail,
)

__all__ = [
    "check_modification",
    "check_verdict",
    "refuses_one_recipient",
    "require_end_of_message",
]

_CONNECTION_VERDICTS: Final = (Continue, Accept, Reject, TempFail, Shutdown)
_MESSAGE_VERDICTS: Final = (Continue, Accept, Reject, TempFail, Discard, Shutdown)
#: Legal final replies per command byte. Skip is checked apart (it needs SKIP).
_LEGAL: Final[dict[int, tuple[type[Reply], ...]]] = {
    ord("C"): _CONNECTION_VERDICTS,
    ord("H"): _CONNECTION_VERDICTS,
    ord("U"): _CONNECTION_VERDICTS,
    **{ord(command): _MESSAGE_VERDICTS for command in "MRTLNE"},
    ord("B"): (*_MESSAGE_VERDICTS, Skip),
}
_EOM: Final = ord("E")
_BODY: Final = ord("B")
#: At RCPT, these refuse (or accept) that recipient alone: the message goes on.
_RECIPIENT_LEVEL: Final = (Continue, Reject, TempFail)


def require_end_of_message(command: int, reply: Reply) -> None:
    """Raise unless ``command`` is end of message (modifications and progress only go there)."""
    if command != _EOM:
        raise LocalProtocolError(
            f"{type(reply).__name__} is only allowed during end of message, "
            f"not in answer to {chr(command)!r}",
            command=chr(command),
        )


def check_modification(command: int, reply: Reply, options: SessionOptions) -> None:
    """Raise unless the modification ``reply`` may be sent now, with what was negotiated."""
    require_end_of_message(command, reply)
    action = reply.required_action
    if not int(options.actions) & int(action):  # int(): IntFlag's & runs in Python
        raise ActionNotNegotiated(
            f"{type(reply).__name__} needs the {action.name} action, which the MTA did not grant",
            action=action.name or str(action),
            command=chr(command),
        )


def check_verdict(command: int, reply: Reply, options: SessionOptions) -> None:
    """Raise unless ``reply`` is a valid final answer to ``command``."""
    legal = _LEGAL.get(command, ())
    if isinstance(reply, Skip) and command == _BODY and not options.skip:
        raise LocalProtocolError("Skip needs the SKIP protocol flag", command="s")
    if not isinstance(reply, legal):
        names = ", ".join(cls.__name__ for cls in legal)
        raise LocalProtocolError(
            f"{type(reply).__name__} is not a valid answer to {chr(command)!r}; valid: {names}",
            command=chr(command),
        )


def refuses_one_recipient(reply: Reply) -> bool:
    """Whether ``reply``, at RCPT, concerns that recipient alone."""
    return isinstance(reply, _RECIPIENT_LEVEL)
