"""The testing kit: play the MTA against an App in memory, or against any milter over a socket.

Everything here goes through the real codec and state machines, the MTA side included, so a
test passes only if an MTA that follows the protocol would see the same thing.
"""

from milterapp.testing.client import (
    AsyncMilterTestClient,
    MessageResult,
    MilterTestClient,
    StageReply,
)
from milterapp.testing.delivery import DeliveredMessage
from milterapp.testing.profiles import POSTFIX, SENDMAIL, MtaProfile, SessionFacts
from milterapp.testing.sockets import Answer, MtaClient, ServerThread, bound_spec, serving

__all__ = [
    "POSTFIX",
    "SENDMAIL",
    "Answer",
    "AsyncMilterTestClient",
    "DeliveredMessage",
    "MessageResult",
    "MilterTestClient",
    "MtaClient",
    "MtaProfile",
    "ServerThread",
    "SessionFacts",
    "StageReply",
    "bound_spec",
    "serving",
]
