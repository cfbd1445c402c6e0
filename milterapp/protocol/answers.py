"""Which replies may answer which command (protocol reference §4, §7).

Pure rules, without state: the state machine (:mod:`milterapp.protocol.machine`) applies them
before it sends a reply, and keeps what depends on the conversation so far (the order of
replacement body packets, what a verdict ends).
"""

from __future__ import annotations

from typing import Final

from milterapp.errors import ActionNotNegotiated, LocalProtocolError
from milterapp.protocol.negotiation import SessionOptions
from milterapp.protocol.stages import BY_COMMAND
from milterapp.replies import Reply, Skip

__all__ = ["LEGAL_REPLIES", "check_modification", "check_verdict", "require_end_of_message"]

#: Legal final replies per command byte (``Stage.replies``). Skip is checked apart (it needs
#: SKIP).
LEGAL_REPLIES: Final[dict[int, tuple[type[Reply], ...]]] = {
    command: stage.replies for command, stage in BY_COMMAND.items() if stage.replies
}
_EOM: Final = ord("E")
_BODY: Final = ord("B")


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
    legal = LEGAL_REPLIES.get(command, ())
    if isinstance(reply, Skip) and command == _BODY and not options.skip:
        raise LocalProtocolError("Skip needs the SKIP protocol flag", command="s")
    if not isinstance(reply, legal):
        names = ", ".join(cls.__name__ for cls in legal)
        raise LocalProtocolError(
            f"{type(reply).__name__} is not a valid answer to {chr(command)!r}; valid: {names}",
            command=chr(command),
        )
