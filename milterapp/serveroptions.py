"""The options of a milter server (:class:`ServerOptions`), validated as one model: what
``app.run()``, ``milterapp run`` and :class:`~milterapp.server.MilterServer` accept."""

from __future__ import annotations

import socket
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from milterapp.limits import (
    DEFAULT_MAX_HEADER_SIZE,
    DEFAULT_MAX_HEADERS,
    DEFAULT_MAX_MACROS_PER_PACKET,
    DEFAULT_MAX_RECIPIENTS,
    DEFAULT_READ_TIMEOUT,
    DEFAULT_TIMEOUT,
    DEFAULT_WRITE_TIMEOUT,
)
from milterapp.protocol.constants import DEFAULT_MAX_DATA_SIZE, MAX_DATA_SIZE_1M
from milterapp.spec import ConnectionSpec, default_connection_spec

__all__ = [
    "DEFAULT_BACKLOG",
    "ServerOptions",
    "default_remove_unix_socket_on_close",
    "default_unix_socket_group",
    "default_unix_socket_mode",
]

#: The listen(2) backlog by default: the system's maximum, as libmilter's.
DEFAULT_BACKLOG: int = socket.SOMAXCONN


class ServerOptions(BaseModel):
    """Every option of the server, validated when it starts (milter-client's settings).

    Attributes:
        spec: where to listen (``inet:10025@[127.0.0.1]``, ``unix:/run/milter.sock``...).
        backlog: the listen(2) backlog: connections the kernel completes while the server has
            not accepted them yet. The default, ``socket.SOMAXCONN`` (as libmilter's; the
            kernel caps it at ``net.core.somaxconn``), absorbs a burst of MTA processes
            connecting at once; past a full backlog the kernel drops handshakes, and each such
            connection waits a second or more for a retry.
        unix_socket_mode: permissions of a unix socket (0o660: the MTA's group may connect).
        unix_socket_group: group of a unix socket, by name or gid (None: the process's).
        remove_unix_socket_on_create: remove a stale unix socket (never a live one, never a
            file that is not a socket) before creating ours.
        remove_unix_socket_on_close: remove our unix socket when the server stops.
        timeout: seconds a connection may stay idle between commands before it is closed.
        read_timeout: seconds a command may take to arrive whole once its first byte came
            (a peer trickling bytes is dropped, logged as ``read_timeout``); 0: no limit.
        write_timeout: seconds the MTA may leave our replies unread before the connection
            is dropped (logged as ``write_timeout``); 0: no limit.
        shutdown_grace: seconds in-flight messages get to finish at shutdown.
        listen_socket: a socket that is already bound and listening, used instead of spec.
        socket_activation: use the socket systemd passes (LISTEN_FDS), when there is one.
        max_data_size: largest packet payload accepted from the MTA. 1 MiB by default:
            Postfix sends each header in one packet whatever its size, and its
            header_size_limit is 100 KiB by default. None accepts only the negotiated size.
        max_connections: most connections served at once; one more is closed before
            negotiation (the MTA applies its failure policy: mail is deferred) and logged
            as ``connection_refused_limit``. Each worker process counts its own.
        max_macros_per_packet: most macros in one ``D`` packet; more is a protocol error
            that closes that connection (logged as ``limit_exceeded``).
        max_headers: most headers per message; the message is then tempfailed
            (452 4.3.4 "too many headers").
        max_header_size: largest header in bytes, name and value; a larger one tempfails
            its message (452 4.3.4 "header too large").
        max_recipients: most recipients per message; each one above is tempfailed
            (452 4.5.3 "too many recipients") and not added to ``ctx.message.recipients``.

    Each limit is off when 0. A message over a limit is answered at the command that went
    over it if the MTA expects a reply to it, else at the next of its commands that does
    (at the latest, end of message); its handlers no longer run, and the connection goes on
    with the next message. Every limit hit is logged as ``limit_exceeded`` with the limit's
    name and value.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)

    spec: ConnectionSpec = Field(default_factory=default_connection_spec)
    backlog: int = Field(default=DEFAULT_BACKLOG, ge=1)
    unix_socket_mode: int = Field(default=0o660, ge=0, le=0o777)
    unix_socket_group: str | int | None = None
    remove_unix_socket_on_create: bool = True
    remove_unix_socket_on_close: bool = True
    timeout: float = Field(default=DEFAULT_TIMEOUT, gt=0)
    read_timeout: float = Field(default=DEFAULT_READ_TIMEOUT, ge=0)
    write_timeout: float = Field(default=DEFAULT_WRITE_TIMEOUT, ge=0)
    shutdown_grace: float = Field(default=30.0, ge=0)
    listen_socket: socket.socket | None = None
    socket_activation: bool = True
    max_data_size: int | None = Field(default=MAX_DATA_SIZE_1M, ge=DEFAULT_MAX_DATA_SIZE)
    max_connections: int = Field(default=1000, ge=0)
    max_macros_per_packet: int = Field(default=DEFAULT_MAX_MACROS_PER_PACKET, ge=0)
    max_headers: int = Field(default=DEFAULT_MAX_HEADERS, ge=0)
    max_header_size: int = Field(default=DEFAULT_MAX_HEADER_SIZE, ge=0)
    max_recipients: int = Field(default=DEFAULT_MAX_RECIPIENTS, ge=0)

    @field_validator("spec", mode="before")
    @classmethod
    def _parse_spec(cls, value: Any) -> Any:
        if value is None:
            return default_connection_spec()
        return ConnectionSpec.parse(value) if isinstance(value, str) else value


def default_unix_socket_mode() -> int:
    """The unix socket mode used when none is given (0o660)."""
    return int(ServerOptions.model_fields["unix_socket_mode"].default)


def default_unix_socket_group() -> str | int | None:
    """The unix socket group used when none is given (None: the process's group)."""
    value: str | int | None = ServerOptions.model_fields["unix_socket_group"].default
    return value


def default_remove_unix_socket_on_close() -> bool:
    """Whether the unix socket is removed when the server stops, unless told (True)."""
    return bool(ServerOptions.model_fields["remove_unix_socket_on_close"].default)
