"""Models of what the MTA sends to a milter, one frozen pydantic model per command.

Text on the wire is 8-bit and not always UTF-8. Models that carry text keep it as ``str``
decoded with UTF-8 and ``surrogateescape``: decoding never raises, and encoding back with the
same error handler gives the original bytes, so a value read from a header can be written back
unchanged. :class:`Header` also keeps its raw bytes.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar, Self, TypeAlias

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from milterapp.constants import ActionFlag, Command, ProtocolFlag
from milterapp.smtpvalues import (
    EsmtpArgs,
    decode_text,
    encode_text,
    macro_name,
    strip_brackets,
)

__all__ = [
    "Abort",
    "AddressFamily",
    "Body",
    "Connect",
    "ConnectionClosed",
    "ConnectionOpened",
    "Data",
    "EndOfHeaders",
    "EndOfMessage",
    "EnvFrom",
    "EnvRcpt",
    "EsmtpArgs",
    "Event",
    "Header",
    "Helo",
    "Macros",
    "Negotiate",
    "Quit",
    "QuitNoClose",
    "Unknown",
    "Unparsed",
    "decode_text",
    "encode_text",
    "macro_name",
    "strip_brackets",
]

IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address

#: Bytes longer than this are shown cut short in a model's repr, with their length.
REPR_BYTES_LIMIT = 64
#: How many leading bytes a cut-short value shows.
_REPR_BYTES_SHOWN = 48


class _Shown:
    """A value's display form in a repr, written as it is (no quotes added)."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text


def _flag_text(value: enum.Flag) -> str:
    kind = type(value).__name__
    if value.name is not None and value.name.isidentifier():  # a member or an alias: ALL
        return f"{kind}.{value.name}"
    parts = [f"{kind}.{member.name}" for member in value]
    known = 0
    for member in value:
        known |= member.value
    rest = value.value & ~known
    if rest or not parts:
        parts.append(f"{kind}({rest})")
    return "|".join(parts)


def repr_value(value: Any) -> Any:
    """Return ``value`` as a model's repr shows it.

    Enum members read as written in code (``AddressFamily.INET``, ``ActionFlag.ADDHDRS|
    ActionFlag.CHGBODY``); ESMTP parameters as the list of strings a model accepts; bytes
    longer than :data:`REPR_BYTES_LIMIT` cut short with their length, so that a body chunk
    does not flood a log. Everything else is returned unchanged.
    """
    if isinstance(value, bytes):
        if len(value) > REPR_BYTES_LIMIT:
            return _Shown(f"{value[:_REPR_BYTES_SHOWN]!r}... ({len(value)} bytes)")
        return value
    if isinstance(value, enum.Enum):
        if isinstance(value, enum.Flag):
            return _Shown(_flag_text(value))
        return _Shown(f"{type(value).__name__}.{value.name}")
    if isinstance(value, EsmtpArgs):
        return value.as_strings()
    if isinstance(value, dict) and value:
        items = (f"{repr_value(k)!r}: {repr_value(v)!r}" for k, v in value.items())
        return _Shown("{" + ", ".join(items) + "}")
    return value


def repr_args(
    model: BaseModel, derived: Mapping[str, Any] | None = None
) -> Iterator[tuple[str, Any]]:
    """The fields a model's repr shows: required ones, and the others where not the default.

    ``derived`` gives the value a field takes when it is not given, for fields whose default
    is computed from others (``raw`` of an envelope is ``<address>``). Events and replies use
    this as pydantic's ``__repr_args__`` hook, so that their ``repr()`` and ``str()`` read
    ``TempFail(code=451, text='try later')`` and ``Continue()``. It runs only when a repr is
    asked for: construction does no extra work.
    """
    fields = type(model).__pydantic_fields__
    for name, value in model.__dict__.items():
        field = fields.get(name)
        if field is None or not field.repr:
            continue
        if derived is not None and name in derived:
            if value == derived[name]:
                continue
        elif not field.is_required() and value == field.get_default(call_default_factory=True):
            continue
        yield name, repr_value(value)


class Event(BaseModel):
    """Base of every MTA command model.

    ``command`` is the command byte on the wire (``b""`` for events with no packet).
    ``repr()`` and ``str()`` show the class and the fields that are set:
    ``EnvFrom(address='a@example.org', args=['SIZE=1024'])``, ``Body(chunk=b'...' (4096
    bytes))`` (long bytes cut short).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    command: ClassVar[bytes] = b""

    def __repr_args__(self) -> Iterator[tuple[str, Any]]:
        return repr_args(self)

    def __str__(self) -> str:
        return self.__repr__()


class Negotiate(Event):
    """Option negotiation (``O``): what the MTA offers."""

    command: ClassVar[bytes] = Command.OPTNEG.value

    version: int = Field(ge=0, le=0xFFFFFFFF)
    actions: ActionFlag
    protocol: ProtocolFlag


class Macros(Event):
    """Macro definitions (``D``) for the command whose letter is ``stage``.

    Look names up with or without braces: ``macros["client_addr"]`` finds ``{client_addr}``.
    """

    command: ClassVar[bytes] = Command.MACRO.value

    stage: str
    values: dict[str, str] = Field(default_factory=dict)

    @field_validator("stage")
    @classmethod
    def _one_byte(cls, stage: str) -> str:
        # The stage is one byte on the wire, carried as the character of the same number.
        if len(stage) != 1 or not "\x01" <= stage <= "\xff":
            raise ValueError(f"stage must be one character from U+0001 to U+00FF, not {stage!r}")
        return stage

    def get(self, name: str, default: str | None = None) -> str | None:
        """Return the value of macro ``name`` (with or without braces), or ``default``."""
        key = macro_name(name)
        for candidate in (key, "{" + key + "}"):
            if candidate in self.values:
                return self.values[candidate]
        return default

    def __getitem__(self, name: str) -> str:
        value = self.get(name)
        if value is None:
            raise KeyError(name)
        return value

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.get(name) is not None


class AddressFamily(enum.StrEnum):
    """Address family of the SMTP client in a :class:`Connect` (the wire letter)."""

    UNKNOWN = "U"
    UNIX = "L"
    INET = "4"
    INET6 = "6"


def _ip_address(value: object) -> object:
    if isinstance(value, str):
        try:
            return ipaddress.ip_address(value)
        except ValueError:
            return value  # a unix socket path
    return value


class Connect(Event):
    """SMTP client connection (``C``).

    ``address`` is an :mod:`ipaddress` object for INET/INET6, the socket path for UNIX, and
    None for UNKNOWN; ``port`` is None for UNKNOWN.
    """

    command: ClassVar[bytes] = Command.CONNECT.value

    hostname: str
    family: AddressFamily
    port: int | None = Field(default=None, ge=0, le=65535)
    address: IPAddress | str | None = None

    @model_validator(mode="before")
    @classmethod
    def _parse_address(cls, data: Any) -> Any:
        # An address given as text becomes an ipaddress object for INET/INET6 (never for a
        # unix socket path, which may look like anything).
        if isinstance(data, dict) and data.get("family") in (
            AddressFamily.INET,
            AddressFamily.INET6,
            "4",
            "6",
        ):
            return {**data, "address": _ip_address(data.get("address"))}
        return data

    @model_validator(mode="after")
    def _check_family(self) -> Connect:
        if self.family is AddressFamily.UNKNOWN:
            if self.port is not None or self.address is not None:
                raise ValueError("family UNKNOWN carries neither port nor address")
        elif self.port is None or self.address is None:
            raise ValueError(f"family {self.family.name} needs a port and an address")
        elif self.family is AddressFamily.INET and not isinstance(
            self.address, ipaddress.IPv4Address
        ):
            raise ValueError(f"family INET needs an IPv4 address, not {self.address!r}")
        elif self.family is AddressFamily.INET6 and not isinstance(
            self.address, ipaddress.IPv6Address
        ):
            raise ValueError(f"family INET6 needs an IPv6 address, not {self.address!r}")
        elif self.family is AddressFamily.UNIX and not isinstance(self.address, str):
            raise ValueError("family UNIX needs a socket path as address")
        return self


class Helo(Event):
    """HELO or EHLO (``H``): the name the client gave."""

    command: ClassVar[bytes] = Command.HELO.value

    name: str


class _Envelope(Event):
    """Shared shape of MAIL and RCPT: an address and ESMTP parameters.

    ``address`` has no angle brackets (``""`` for the null sender); ``raw`` is the address
    argument exactly as the MTA sent it (derived as ``<address>`` when not given).
    """

    address: str
    raw: str = ""
    args: EsmtpArgs = EsmtpArgs()

    @model_validator(mode="before")
    @classmethod
    def _fill_in(cls, data: Any) -> Any:
        if isinstance(data, dict):
            if "raw" not in data and "address" in data:
                data = {**data, "raw": f"<{data['address']}>"}
            if isinstance(data.get("args"), list | tuple):
                data = {**data, "args": EsmtpArgs.parse(data["args"])}
        return data

    @classmethod
    def from_raw(cls, raw: str, args: list[str] | tuple[str, ...] = ()) -> Self:
        """Build from the argument as sent (``<a@example.org>``) and ESMTP parameters."""
        return cls(address=strip_brackets(raw), raw=raw, args=EsmtpArgs.parse(args))

    def __repr_args__(self) -> Iterator[tuple[str, Any]]:
        return repr_args(self, {"raw": f"<{self.address}>"})

    @property
    def domain(self) -> str:
        """The part after the last ``@``, lower-cased (``""`` when there is none)."""
        _, at, domain = self.address.rpartition("@")
        return domain.lower() if at else ""


class EnvFrom(_Envelope):
    """MAIL FROM (``M``): the envelope sender and its ESMTP parameters."""

    command: ClassVar[bytes] = Command.MAIL.value


class EnvRcpt(_Envelope):
    """RCPT TO (``R``): one envelope recipient and its ESMTP parameters."""

    command: ClassVar[bytes] = Command.RCPT.value


class Data(Event):
    """DATA (``T``): the client is about to send the message content."""

    command: ClassVar[bytes] = Command.DATA.value


class Header(Event):
    """One message header (``L``).

    ``name`` and ``value`` are decoded with :func:`decode_text`, so they never fail to decode
    and ``raw_name``/``raw_value`` give back the exact bytes received. The value is kept as
    sent: without HDR_LEADSPC the MTA has already removed one leading space; with it
    (``leading_space``) the value keeps its leading whitespace. Folded values contain ``\\n``
    followed by the continuation whitespace.
    """

    command: ClassVar[bytes] = Command.HEADER.value

    name: str
    value: str
    leading_space: bool = False

    @field_validator("name")
    @classmethod
    def _not_empty(cls, name: str) -> str:
        # Not Field(min_length=1): pydantic's length check refuses the surrogates that
        # carry non-UTF-8 bytes.
        if not name:
            raise ValueError("header name must not be empty")
        return name

    @property
    def raw_name(self) -> bytes:
        """The field name exactly as received."""
        return encode_text(self.name)

    @property
    def raw_value(self) -> bytes:
        """The field value exactly as received."""
        return encode_text(self.value)


class EndOfHeaders(Event):
    """End of headers (``N``)."""

    command: ClassVar[bytes] = Command.EOH.value


class Body(Event):
    """One chunk of the message body (``B``), CRLF line endings, at most the negotiated size."""

    command: ClassVar[bytes] = Command.BODY.value

    chunk: bytes


class EndOfMessage(Event):
    """End of message (``E``): the milter may now modify the message and gives its verdict.

    ``chunk`` is normally empty; libmilter treats data here as a last body chunk, and so do we.
    """

    command: ClassVar[bytes] = Command.BODYEOB.value

    chunk: bytes = b""


class Abort(Event):
    """Abort (``A``): forget the current message; the connection stays."""

    command: ClassVar[bytes] = Command.ABORT.value


class Quit(Event):
    """Quit (``Q``): the MTA is done with this connection."""

    command: ClassVar[bytes] = Command.QUIT.value


class QuitNoClose(Event):
    """Quit without closing (``K``): the connection is reused for a new SMTP session."""

    command: ClassVar[bytes] = Command.QUIT_NC.value


class Unknown(Event):
    """An SMTP command the MTA did not recognise (``U``), without its CRLF."""

    command: ClassVar[bytes] = Command.UNKNOWN.value

    line: str


class Unparsed(Event):
    """A command handed on undecoded, for commands that are only kept
    (``MilterConnection(undecoded=...)``): its command byte and payload are in the machine's
    ``unparsed`` until the next event. Never given to handlers."""


class ConnectionOpened(Event):
    """The MTA opened a connection to the milter (no packet carries this event).

    ``peer`` is the MTA's address as ``host:port``, or the socket path for unix sockets.
    """

    command: ClassVar[bytes] = b""

    peer: str = ""


class ConnectionClosed(Event):
    """The MTA closed the connection (end of file); no packet carries this event."""

    command: ClassVar[bytes] = b""
