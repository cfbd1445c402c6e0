"""milterapp: write Postfix and Sendmail mail filters (milters) in Python.

This module only re-exports the public API. The layers under it, lowest first: the models
(``events``, ``replies``, ``errors``, ``spec``), the sans-IO protocol core
(:mod:`milterapp.protocol`), what a handler sees (``context``), the server
(:mod:`milterapp.server`), the App (``app``, ``handlers``, ``config``), and the tools on top
(:mod:`milterapp.testing`, :mod:`milterapp.load`, :mod:`milterapp.demo`, ``cli``);
docs/architecture.md draws the map.
"""

from milterapp.app import App
from milterapp.config import AppConfig
from milterapp.constants import ActionFlag
from milterapp.context import Context, Message
from milterapp.errors import (
    ActionNotNegotiated,
    ConnectionSpecError,
    LocalProtocolError,
    MilterError,
    NegotiationError,
    NotAvailable,
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
    Quarantine,
    Reject,
    ReplaceBody,
    Shutdown,
    Skip,
    TempFail,
)
from milterapp.server import MilterServer, ServerOptions
from milterapp.server.connection import COMPILED
from milterapp.spec import ConnectionSpec

__version__ = "0.1.0.dev0"

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
    "Header",
    "Helo",
    "InsertHeader",
    "LocalProtocolError",
    "Macros",
    "Message",
    "MilterError",
    "MilterServer",
    "Negotiate",
    "NegotiationError",
    "NotAvailable",
    "ProtocolError",
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
