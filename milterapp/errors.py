"""Every exception milterapp raises, in one hierarchy.

::

    MilterError(Exception)
    ├── ProtocolError                 the milter conversation broke
    │   ├── RemoteProtocolError       the MTA sent something malformed or out of order
    │   │   ├── FrameTooLargeError    a packet length above the allowed maximum (or zero)
    │   │   └── LimitExceededError    a packet over a configured limit (macros per packet)
    │   └── LocalProtocolError        we tried to send something the protocol forbids now
    │       └── ActionNotNegotiated   a modification whose action the MTA did not grant
    ├── NegotiationError              the MTA cannot offer what the application requires
    ├── ConnectionSpecError           a connection spec string is malformed (also a ValueError)
    ├── SetupError                    the application is registered or configured wrongly
    ├── NotAvailable                  a handler read what the context does not hold (a LookupError)
    ├── ServerError                   the server cannot start or run (``kind`` says why)
    └── CheckError                    a health check failed (milterapp.server.check)

Messages say what was wrong and where: the command letter, the byte offset or the field.
"""

from __future__ import annotations

import enum

__all__ = [
    "ActionNotNegotiated",
    "ConnectionSpecError",
    "FrameTooLargeError",
    "LimitExceededError",
    "LocalProtocolError",
    "MilterError",
    "NegotiationError",
    "NotAvailable",
    "ProtocolError",
    "RemoteProtocolError",
    "ServerError",
    "ServerErrorKind",
    "SetupError",
]


class MilterError(Exception):
    """Root of every exception raised by milterapp."""


class ProtocolError(MilterError):
    """The milter conversation cannot go on; only this connection is affected.

    Attributes:
        command: the command or response letter involved, when known (``"L"``, ``"y"``).
        offset: byte offset in the payload where the problem was found, when known.
    """

    def __init__(self, message: str, *, command: str | None = None, offset: int | None = None):
        where = []
        if command is not None:
            where.append(f"command {command!r}")
        if offset is not None:
            where.append(f"offset {offset}")
        super().__init__(f"{message} ({', '.join(where)})" if where else message)
        self.command = command
        self.offset = offset


class RemoteProtocolError(ProtocolError):
    """The MTA sent bytes that are malformed or a command that is out of order."""


class FrameTooLargeError(RemoteProtocolError):
    """A packet announced a length of zero or above the allowed maximum."""


class LimitExceededError(RemoteProtocolError):
    """A packet went over a configured limit; the connection closes.

    Attributes:
        limit: the limit's name (``"max_macros_per_packet"``).
        value: the limit's value.
        count: what the packet had.
    """

    def __init__(self, message: str, *, limit: str, value: int, count: int, command: str):
        super().__init__(message, command=command)
        self.limit = limit
        self.value = value
        self.count = count


class LocalProtocolError(ProtocolError):
    """We were asked to send something that the protocol forbids at this point."""


class ActionNotNegotiated(LocalProtocolError):
    """A modification needs an action flag that the MTA did not grant.

    Attributes:
        action: the name of the missing action flag (``"ADDHDRS"``).
    """

    def __init__(self, message: str, *, action: str, command: str | None = None):
        super().__init__(message, command=command)
        self.action = action


class NegotiationError(MilterError):
    """The MTA's offer lacks something the application requires.

    Attributes:
        missing: names of the missing flags (``["CHGFROM"]``), or the problem when no flag
            names it (an unsupported version).
    """

    def __init__(self, message: str, *, missing: list[str] | None = None):
        super().__init__(message)
        self.missing = missing or []


class ConnectionSpecError(MilterError, ValueError):
    """A connection spec (``inet:10025@localhost``, ``unix:/path``) is malformed."""


class SetupError(MilterError):
    """The application was registered or configured wrongly; the message says how to fix it."""


class NotAvailable(MilterError, LookupError):
    """A handler read something the context does not hold: content the app did not ask the
    MTA for (the body without ``keep_message=True``), or a fact not known yet at this stage
    (the client before the connect event). The message says what to change."""


class ServerErrorKind(enum.Enum):
    """Why the server failed, as milter-client's ``MilterClientError`` kinds."""

    RUNNING = "running"
    UNIX_SOCKET = "unix-socket"
    IO = "io"


class ServerError(MilterError):
    """The server cannot start or run.

    Attributes:
        kind: ``RUNNING`` (already running), ``UNIX_SOCKET`` (a unix socket problem) or
            ``IO`` (address in use, cannot bind, other I/O failures).
    """

    def __init__(self, message: str, *, kind: ServerErrorKind):
        super().__init__(message)
        self.kind = kind
