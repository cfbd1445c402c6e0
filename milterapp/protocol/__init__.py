"""The sans-IO milter protocol core: bytes in, events out; replies in, bytes out.

The rule of this package: it never imports asyncio, sockets, selectors, structlog or any
part of the layers above it (``milterapp.context``, the server, the App and up). It depends
only on ``milterapp.errors``, ``milterapp.constants``, the models in ``milterapp.events`` and
``milterapp.replies``, pydantic and the standard library, so it can be driven by any I/O
layer, by tests and by the MTA-side tools alike. ``tests/test_architecture.py`` enforces this.

Modules, lowest first:

    stages       THE table of stages: names, models, macro stages, legal replies, flags
    framing      incremental packet decoder and packet encoder
    payload      the payload cursor and string helpers the codecs share
    commands     MTA commands: payloads to event models and back
    responses    milter responses: reply models to packets and back
    codec        one import for both directions (commands and responses)
    negotiation  the negotiation reply from the MTA's offer and the app's needs
    macros       macro tables per stage, as libmilter keeps them
    answers      which replies may answer which command (pure rules)
    machine      MilterConnection, the milter-side connection state machine
    mta          MtaConnection, the MTA side of the same conversation

This ``__init__`` only re-exports: the core's public names, and the protocol-level names of
the layers below that ``milterapp`` itself leaves out (the flags, the negotiation reply,
progress, the packet-size errors).
"""

from milterapp.constants import (
    ActionFlag,
    Command,
    ConnectionState,
    MacroStage,
    ProtocolFlag,
    ResponseCode,
)
from milterapp.errors import (
    FrameTooLargeError,
    LimitExceededError,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
)
from milterapp.protocol.codec import (
    decode_command,
    decode_response,
    encode_command,
    encode_response,
)
from milterapp.protocol.framing import FrameDecoder, encode_frame
from milterapp.protocol.machine import MilterConnection
from milterapp.protocol.macros import MacroTable
from milterapp.protocol.mta import DEFAULT_OFFER, Answer, MtaConnection
from milterapp.protocol.negotiation import Requirements, SessionOptions, negotiate, session_options
from milterapp.protocol.stages import STAGES, Stage
from milterapp.replies import NegotiationReply, Progress

__all__ = [
    "DEFAULT_OFFER",
    "STAGES",
    "ActionFlag",
    "Answer",
    "Command",
    "ConnectionState",
    "FrameDecoder",
    "FrameTooLargeError",
    "LimitExceededError",
    "LocalProtocolError",
    "MacroStage",
    "MacroTable",
    "MilterConnection",
    "MtaConnection",
    "NegotiationReply",
    "Progress",
    "ProtocolError",
    "ProtocolFlag",
    "RemoteProtocolError",
    "Requirements",
    "ResponseCode",
    "SessionOptions",
    "Stage",
    "decode_command",
    "decode_response",
    "encode_command",
    "encode_frame",
    "encode_response",
    "negotiate",
    "session_options",
]
