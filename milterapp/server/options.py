"""The options of a milter server (:class:`ServerOptions`), validated as one model: what
``app.run()``, ``milterapp run`` and :class:`~milterapp.server.MilterServer` accept.

The per-connection limits are a model of their own (:class:`~milterapp.server.limits.Limits`)
that the options hold; they may be given flat (``ServerOptions(max_recipients=100)``), as
every caller does. :class:`RunOptions` holds what ``app.run()`` takes besides: processes,
event loop and logging. The command line builds its flags and help texts from these fields.
"""

from __future__ import annotations

import socket
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from milterapp.constants import DEFAULT_MAX_DATA_SIZE, MAX_DATA_SIZE_1M
from milterapp.server.limits import Limits
from milterapp.server.logsetup import DEFAULT_SYSLOG_ADDRESS, LogFormat, LogLevel
from milterapp.server.loops import LoopName
from milterapp.spec import ConnectionSpec, default_connection_spec

__all__ = [
    "DEFAULT_BACKLOG",
    "RunOptions",
    "ServerOptions",
    "default_remove_unix_socket_on_close",
    "default_unix_socket_group",
    "default_unix_socket_mode",
]

#: The listen(2) backlog by default: the system's maximum, as libmilter's.
DEFAULT_BACKLOG: int = socket.SOMAXCONN


class ServerOptions(BaseModel):
    """Every option of the server, validated when it starts (milter-client's settings).

    Each field's description is also its help text on the command line; ``limits`` holds
    the per-connection limits (:class:`~milterapp.server.limits.Limits`), whose fields may
    also be given here by name.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)

    spec: ConnectionSpec = Field(
        default_factory=default_connection_spec,
        description="where to listen, e.g. inet:10025@[127.0.0.1] or unix:/path",
    )
    backlog: int = Field(
        default=DEFAULT_BACKLOG,
        ge=1,
        description="the listen(2) backlog: connections the kernel completes before they are "
        "accepted (the system's maximum, as libmilter's: a burst of MTA processes connecting "
        "at once waits there; past it, handshakes are dropped and retried a second later)",
    )
    unix_socket_mode: int = Field(
        default=0o660,
        ge=0,
        le=0o777,
        description="permissions of a unix socket, in octal (660: the MTA's group may connect)",
    )
    unix_socket_group: str | int | None = Field(
        default=None,
        description="group of a unix socket, by name or gid (none: the process's); the "
        "milter's user must be a member of it",
    )
    remove_unix_socket_on_create: bool = Field(
        default=True,
        description="remove a stale unix socket (never a live one, never a file that is not a "
        "socket) before creating ours",
    )
    remove_unix_socket_on_close: bool = Field(
        default=True, description="remove our unix socket when the server stops"
    )
    shutdown_grace: float = Field(
        default=30.0, ge=0, description="seconds in-flight messages get to finish at shutdown"
    )
    listen_socket: socket.socket | None = Field(
        default=None,
        description="a socket that is already bound and listening, used instead of spec",
    )
    socket_activation: bool = Field(
        default=True,
        description="use the socket systemd passes (LISTEN_FDS), when there is one",
    )
    max_data_size: int | None = Field(
        default=MAX_DATA_SIZE_1M,
        ge=DEFAULT_MAX_DATA_SIZE,
        description="largest packet payload accepted from the MTA, in bytes (Postfix sends "
        "each header in one packet whatever its size; none: only the negotiated size)",
    )
    max_connections: int = Field(
        default=1000,
        ge=0,
        description="most connections served at once (each worker counts its own); one more "
        "is closed before negotiation, so the MTA defers its mail; 0: no limit",
    )
    limits: Limits = Field(
        default_factory=Limits, description="what one connection may cost (Limits)"
    )

    @model_validator(mode="before")
    @classmethod
    def _gather_limits(cls, data: Any) -> Any:
        # The limits may be given flat, by their own names, as app.run() and the CLI do.
        if not isinstance(data, dict):
            return data
        flat = {name: data[name] for name in Limits.model_fields if name in data}
        if not flat:
            return data
        if "limits" in data:
            raise ValueError(
                f"give the limits either as limits= or by name ({', '.join(flat)}), not both"
            )
        rest = {name: value for name, value in data.items() if name not in flat}
        return {**rest, "limits": flat}

    @classmethod
    def from_spec(cls, spec: str | ConnectionSpec | None = None, **options: Any) -> ServerOptions:
        """Validate ``options`` with ``spec`` (None: the default spec).

        A spec string is parsed first, so a bad one raises
        :class:`~milterapp.errors.ConnectionSpecError` itself (one clear line), not wrapped
        in pydantic's ValidationError.

        Raises:
            ConnectionSpecError: ``spec`` is malformed.
            pydantic.ValidationError: an option is unknown or out of range.
        """
        if isinstance(spec, str):
            spec = ConnectionSpec.parse(spec)
        return cls.model_validate({"spec": spec, **options})

    @field_validator("spec", mode="before")
    @classmethod
    def _parse_spec(cls, value: Any) -> Any:
        if value is None:
            return default_connection_spec()
        return ConnectionSpec.parse(value) if isinstance(value, str) else value


class RunOptions(BaseModel):
    """What ``app.run()`` and ``milterapp run`` take besides :class:`ServerOptions`.

    Each field's description is also its help text on the command line.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    workers: int = Field(
        default=1,
        ge=1,
        strict=True,
        description="processes serving the socket, forked (Linux; see docs/server.md)",
    )
    loop: LoopName = Field(
        default="auto",
        description="event loop: uvloop when installed (auto), asyncio's, or uvloop",
    )
    log_format: LogFormat = Field(
        default="text",
        description="one key=value line per event on stderr (text), or one JSON object (json)",
    )
    log_level: LogLevel = Field(
        default="INFO", description="the least severe events logged (any case)"
    )
    metrics: str | None = Field(
        default=None,
        description="serve Prometheus metrics at http://HOST:PORT/metrics, and /healthz "
        "(needs the metrics extra: pip install 'milterapp[metrics]')",
    )
    syslog: str | None = Field(
        default=None,
        description="log to the syslog at this address (facility mail) instead of stderr: "
        f"a socket path, or host:port for UDP; the flag alone means {DEFAULT_SYSLOG_ADDRESS}",
    )

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @field_validator("syslog", mode="before")
    @classmethod
    def _syslog_address(cls, value: Any) -> Any:
        # app.run(syslog=True) as the bare flag; False as none.
        if value is True:
            return DEFAULT_SYSLOG_ADDRESS
        return None if value is False else value


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
