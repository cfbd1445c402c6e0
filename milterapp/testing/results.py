"""What the testing kit reports of a message: each stage's answer (:class:`StageReply`)
and the whole result (:class:`MessageResult`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from milterapp.events import (
    Event,
)
from milterapp.protocol.mta import Answer
from milterapp.replies import (
    Accept,
    Continue,
    Discard,
    Modification,
    Reject,
    Shutdown,
    TempFail,
    Verdict,
)
from milterapp.testing.delivery import DeliveredMessage

__all__ = ["MessageResult", "StageReply"]


@dataclass(frozen=True)
class StageReply:
    """The milter's answer to one command."""

    stage: str
    event: Event
    answer: Answer

    @property
    def verdict(self) -> Verdict | Shutdown | None:
        return self.answer.verdict


@dataclass
class MessageResult:
    """What happened to one message.

    Attributes:
        replies: the milter's answer to each command that got one, in order.
        verdict: the verdict that decided the message (Continue at end of message = accept).
        stage: the stage that verdict came from (``"envfrom"``, ``"eom"``...).
        recipients: each recipient's fate: Continue (accepted) or the refusal.
        modifications: what the milter asked for at end of message, in order.
        delivered: the message as the MTA would deliver it, or None if it is not delivered.
    """

    replies: list[StageReply] = field(default_factory=list)
    verdict: Verdict | Shutdown = field(default_factory=Continue)
    stage: str = "eom"
    recipients: dict[str, Verdict | Shutdown] = field(default_factory=dict)
    modifications: list[Modification] = field(default_factory=list)
    delivered: DeliveredMessage | None = None

    @property
    def accepted(self) -> bool:
        """The MTA goes on to deliver the message (possibly modified, or quarantined)."""
        return isinstance(self.verdict, Continue | Accept)

    @property
    def rejected(self) -> bool:
        return isinstance(self.verdict, Reject)

    @property
    def tempfailed(self) -> bool:
        return isinstance(self.verdict, TempFail | Shutdown)

    @property
    def discarded(self) -> bool:
        return isinstance(self.verdict, Discard)

    @property
    def quarantined(self) -> str | None:
        """The quarantine reason, if the milter asked for one."""
        return self.delivered.quarantine if self.delivered else None

    def reply(self, stage: str) -> StageReply | None:
        """The first answer at ``stage`` (``"envfrom"``, ``"eom"``...), if any."""
        return next((reply for reply in self.replies if reply.stage == stage), None)
