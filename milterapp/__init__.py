"""milterapp: write Postfix and Sendmail mail filters (milters) in Python.

The public API is re-exported here; the sans-IO protocol core lives in
:mod:`milterapp.protocol`.
"""

from importlib.machinery import EXTENSION_SUFFIXES as _EXTENSION_SUFFIXES

from milterapp import session as _session
from milterapp.app import App, AppConfig
from milterapp.context import Context, Message
from milterapp.errors import (
    ActionNotNegotiated,
    ConnectionSpecError,
    FrameTooLargeError,
    LocalProtocolError,
    MilterError,
    NegotiationError,
    ProtocolError,
    RemoteProtocolError,
    ServerError,
    ServerErrorKind,
    SetupError,
)
from milterapp.events import (
    Abort,
    AddressFamily,
    Body,
    Connect,
    ConnectionClosed,
    ConnectionOpened,
    Data,
    EndOfHeaders,
    EndOfMessage,
    EnvFrom,
    EnvRcpt,
    EsmtpArgs,
    Event,
    Header,
    Helo,
    Macros,
    Negotiate,
    Quit,
    QuitNoClose,
    Unknown,
)
from milterapp.protocol.constants import ActionFlag, MacroStage, ProtocolFlag
from milterapp.replies import (
    Accept,
    AddHeader,
    AddRecipient,
    ChangeHeader,
    ChangeSender,
    Continue,
    DeleteRecipient,
    Discard,
    InsertHeader,
    NegotiationReply,
    Progress,
    Quarantine,
    Reject,
    ReplaceBody,
    Shutdown,
    Skip,
    TempFail,
)
from milterapp.server import MilterServer, ServerOptions
from milterapp.spec import ConnectionSpec

__version__ = "0.1.0.dev0"

#: True when this installation runs the per-packet path compiled with mypyc (a build with
#: ``HATCH_BUILD_HOOK_ENABLE_MYPYC=1``); False for the pure-Python build. Same behaviour either
#: way; see docs/performance.md.
COMPILED: bool = (_session.__file__ or "").endswith(tuple(_EXTENSION_SUFFIXES))

__all__ = [
    "COMPILED",
    "Abort",
    "Accept",
    "ActionFlag",
    "ActionNotNegotiated",
    "AddHeader",
    "AddRecipient",
    "AddressFamily",
    "App",
    "AppConfig",
    "Body",
    "ChangeHeader",
    "ChangeSender",
    "Connect",
    "ConnectionClosed",
    "ConnectionOpened",
    "ConnectionSpec",
    "ConnectionSpecError",
    "Context",
    "Continue",
    "Data",
    "DeleteRecipient",
    "Discard",
    "EndOfHeaders",
    "EndOfMessage",
    "EnvFrom",
    "EnvRcpt",
    "EsmtpArgs",
    "Event",
    "FrameTooLargeError",
    "Header",
    "Helo",
    "InsertHeader",
    "LocalProtocolError",
    "MacroStage",
    "Macros",
    "Message",
    "MilterError",
    "MilterServer",
    "Negotiate",
    "NegotiationError",
    "NegotiationReply",
    "Progress",
    "ProtocolError",
    "ProtocolFlag",
    "Quarantine",
    "Quit",
    "QuitNoClose",
    "Reject",
    "RemoteProtocolError",
    "ReplaceBody",
    "ServerError",
    "ServerErrorKind",
    "ServerOptions",
    "SetupError",
    "Shutdown",
    "Skip",
    "TempFail",
    "Unknown",
    "__version__",
]
