"""Connection specs: where a milter listens and where the MTA connects to it.

A spec is ``SCHEME:INFORMATION``, as milter manager and Sendmail write it:

* ``inet:PORT``, ``inet:PORT@HOST``, ``inet:PORT@[ADDRESS]``: IPv4;
* ``inet6:PORT``, ``inet6:PORT@HOST``, ``inet6:PORT@[ADDRESS]``: IPv6;
* ``unix:PATH`` or ``local:PATH`` (Sendmail's name for it): a unix domain socket.

Postfix's spelling, ``inet:HOST:PORT`` or ``inet:[ADDRESS]:PORT`` as written in
``smtpd_milters``, is accepted too, so a spec can be pasted from main.cf. Parsing checks syntax
only: no name is resolved and no socket is opened.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Final, Literal, Self, TypeAlias

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from milterapp.errors import ConnectionSpecError

__all__ = ["DEFAULT_SPEC", "ConnectionSpec", "Scheme", "default_connection_spec"]

Scheme: TypeAlias = Literal["inet", "inet6", "unix"]

#: The spec used when none is given. Loopback only, as a security property: a filter that
#: nobody configured must not be reachable from the network. The address literal rather than
#: ``localhost`` (milter manager's example), because that name may resolve to ``::1`` first,
#: or to something unexpected when /etc/hosts or the resolver is misconfigured.
DEFAULT_SPEC: Final = "inet:10025@[127.0.0.1]"

# Scheme names are case-insensitive, as in Sendmail; "local" is Sendmail's name for unix.
_SCHEMES: Final[dict[str, Scheme]] = {
    "inet": "inet",
    "inet6": "inet6",
    "unix": "unix",
    "local": "unix",
}
_SCHEME_LIST: Final = "inet, inet6, unix or local"
_EXAMPLES: Final[dict[Scheme, str]] = {
    "inet": DEFAULT_SPEC,
    "inet6": "inet6:10025@[::1]",
    "unix": "unix:/run/milter/milter.sock",
}
# What a host-less inet/inet6 spec binds to, as in libmilter and milter manager: every address.
_WILDCARD: Final[dict[Scheme, str]] = {"inet": "0.0.0.0", "inet6": "::"}  # noqa: S104
_LOOPBACK: Final[dict[Scheme, str]] = {"inet": "127.0.0.1", "inet6": "::1"}
_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_HOSTNAME: Final = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\.?")
_SCOPE_ID: Final = re.compile(r"[A-Za-z0-9_.-]+")


def _port(text: str) -> int:
    if not text:
        raise ValueError("the port is missing")
    if not text.isascii() or not text.isdigit():
        raise ValueError(f"port {text!r} is not a number")
    if len(text.lstrip("0")) > 5 or not 0 <= int(text) <= 65535:
        raise ValueError(f"port {text} is out of range 0..65535")
    return int(text)


def _address(scheme: Scheme, text: str) -> str | None:
    """Return the normalised address, None if ``text`` is not one; raise on the wrong family."""
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if address.version == 6 and scheme == "inet":
        raise ValueError(f"{text} is an IPv6 address; use inet6:PORT@[{text}]")
    if address.version == 4 and scheme == "inet6":
        raise ValueError(f"{text} is an IPv4 address; use inet:PORT@[{text}]")
    scope = getattr(address, "scope_id", None)
    if scope is not None and not _SCOPE_ID.fullmatch(scope):
        raise ValueError(f"{text!r} has an invalid scope (interface) id")
    return str(address)


def _literal(scheme: Scheme, text: str) -> str:
    if not text:
        raise ValueError("the brackets are empty; put an address inside: [127.0.0.1]")
    address = _address(scheme, text)
    if address is None:
        family = "IPv4" if scheme == "inet" else "IPv6"
        raise ValueError(f"{text!r} inside [] is not a valid {family} address")
    return address


def _host(scheme: Scheme, text: str) -> str:
    """Check a host: an address (normalised) or a host name (kept as given)."""
    if not text:
        raise ValueError("the host is empty")
    address = _address(scheme, text)
    if address is not None:
        return address
    if re.fullmatch(r"[0-9.]+", text):
        raise ValueError(f"{text!r} is not a valid IPv4 address")
    if ":" in text:
        raise ValueError(f"{text!r} is not a valid IPv6 address")
    if len(text) > 253 or not _HOSTNAME.fullmatch(text):
        raise ValueError(f"{text!r} is not a valid host name")
    return text


def _path(path: str) -> str:
    if not path:
        raise ValueError("the socket path is empty")
    if "\x00" in path:
        raise ValueError("the socket path contains a NUL character")
    return path


def _bracketed(text: str) -> tuple[str, str]:
    end = text.find("]")
    if end < 0:
        raise ValueError("'[' is not closed by ']'")
    return text[1:end], text[end + 1 :]


def _split(text: str) -> tuple[Scheme, int | None, str | None, str | None]:
    """Parse a spec into (scheme, port, host, path); raise ValueError naming the problem."""
    if not text:
        raise ValueError(f"the spec is empty; write SCHEME:... with SCHEME {_SCHEME_LIST}")
    name, colon, rest = text.partition(":")
    if not colon:
        raise ValueError(f"there is no scheme; write SCHEME:... with SCHEME {_SCHEME_LIST}")
    scheme = _SCHEMES.get(name.lower())
    if scheme is None:
        raise ValueError(f"unknown scheme {name!r}; valid schemes are {_SCHEME_LIST}")
    if scheme == "unix":
        return scheme, None, None, _path(rest)
    host: str | None
    if "@" in rest:  # milter manager and Sendmail: PORT@HOST or PORT@[ADDRESS]
        port_text, _, host = rest.partition("@")
        port = _port(port_text)
        if not host:
            raise ValueError("the host after '@' is empty")
        if host.startswith("["):
            host, after = _bracketed(host)
            if after:
                raise ValueError(f"unexpected {after!r} after ']'")
            return scheme, port, _literal(scheme, host), None
    elif rest.startswith("["):  # Postfix: [ADDRESS]:PORT, the only way it spells IPv6
        host, after = _bracketed(rest)
        if scheme == "inet" and ":" in host:
            scheme = "inet6"
        if not after:
            raise ValueError("the port is missing; write [ADDRESS]:PORT")
        if after[0] != ":":
            raise ValueError(f"unexpected {after!r} after ']'; write [ADDRESS]:PORT")
        return scheme, _port(after[1:]), _literal(scheme, host), None
    elif ":" in rest:  # Postfix: HOST:PORT
        host, _, port_text = rest.rpartition(":")
        if ":" in host:
            raise ValueError(f"an IPv6 address needs brackets: inet6:PORT@[{host}]")
        if not host:
            raise ValueError("the host before ':' is empty")
        port = _port(port_text)
    else:
        return scheme, _port(rest), None, None
    return scheme, port, _host(scheme, host), None


class ConnectionSpec(BaseModel):
    """Where to listen: an IPv4 or IPv6 port with an optional host, or a unix socket path.

    ``host`` is None for the scheme's default, an address (IPv6 without brackets, normalised
    by :mod:`ipaddress`) or a host name kept as given. ``str(spec)`` is the canonical milter
    manager form, and ``ConnectionSpec.parse(str(spec)) == spec`` always holds.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    scheme: Scheme
    # Port 0 asks the system for a free port (tests, embedding); the server reports the port
    # it got, which is what an MTA must then be given.
    port: int | None = Field(default=None, ge=0, le=65535)
    host: str | None = None
    path: str | None = None

    @field_validator("host")
    @classmethod
    def _check_host(cls, host: str | None, info: ValidationInfo) -> str | None:
        scheme = info.data.get("scheme")
        if host is None or scheme not in ("inet", "inet6"):
            return host  # a unix host is refused below
        return _host(scheme, host)

    @model_validator(mode="after")
    def _check_fields(self) -> Self:
        if self.scheme == "unix":
            if self.port is not None or self.host is not None:
                raise ValueError("a unix spec has a path, not a port or host")
            _path(self.path or "")
        else:
            if self.path is not None:
                raise ValueError(f"an {self.scheme} spec has a port and host, not a path")
            if self.port is None:
                raise ValueError("the port is missing")
        return self

    @classmethod
    def parse(cls, text: str) -> ConnectionSpec:
        """Parse ``inet:10025@[127.0.0.1]``, ``unix:/run/milter.sock`` and the other forms.

        Raises:
            ConnectionSpecError: quoting the spec, naming the problem, showing an example.
        """
        try:
            scheme, port, host, path = _split(text)
        except ValueError as exc:
            example = _EXAMPLES[_SCHEMES.get(text.partition(":")[0].lower(), "inet")]
            raise ConnectionSpecError(
                f"invalid connection spec {text!r}: {exc} (for example {example!r})"
            ) from None
        return cls(scheme=scheme, port=port, host=host, path=path)

    def format(self) -> str:
        """The canonical milter manager form: ``inet:10025@[127.0.0.1]``, ``unix:/path``."""
        if self.scheme == "unix":
            return f"unix:{self.path}"
        if self.host is None:
            return f"{self.scheme}:{self.port}"
        return f"{self.scheme}:{self.port}@{_host_text(self.host)}"

    def __str__(self) -> str:
        return self.format()

    @property
    def listen_host(self) -> str | None:
        """The host or address to bind to; None for unix.

        With no host, ``inet:PORT`` binds every IPv4 address (``0.0.0.0``) and ``inet6:PORT``
        every IPv6 address (``::``), as libmilter and milter manager do: whoever writes a
        spec without a host asked for that. Only the *default* spec is loopback-only.
        """
        if self.scheme == "unix":
            return None
        return self.host if self.host is not None else _WILDCARD[self.scheme]

    @property
    def connect_host(self) -> str | None:
        """The host or address the MTA connects to; None for unix.

        No host, or the wildcard address, means the loopback address (``127.0.0.1`` or
        ``::1``): a wildcard is where to listen, not where to connect.
        """
        if self.scheme == "unix":
            return None
        if self.host is None or self.host == _WILDCARD[self.scheme]:
            return _LOOPBACK[self.scheme]
        return self.host

    def postfix_form(self) -> str:
        """The value for Postfix's ``smtpd_milters``: ``inet:127.0.0.1:10025``, ``unix:/path``.

        Postfix has no ``inet6`` scheme: an IPv6 address is written ``inet:[::1]:10025``, and
        a host name under ``inet6`` becomes ``inet:NAME:PORT``, resolved as Postfix's
        ``inet_protocols`` says. main.cf's list syntax would split a path at spaces or commas.
        """
        if self.scheme == "unix":
            return f"unix:{self.path}"
        host = self.connect_host or ""
        if ":" in host:
            host = f"[{host}]"
        return f"inet:{host}:{self.port}"

    def sendmail_form(self) -> str:
        """The value for Sendmail's ``S=`` equate: ``inet:10025@[127.0.0.1]``, ``local:/path``."""
        if self.scheme == "unix":
            return f"local:{self.path}"
        return f"{self.scheme}:{self.port}@{_host_text(self.connect_host or '')}"


def _host_text(host: str) -> str:
    """A host as written after ``@``: an address in brackets, a name as it is."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return host
    return f"[{host}]"


def default_connection_spec() -> ConnectionSpec:
    """The spec used when none is given: :data:`DEFAULT_SPEC`, loopback only.

    milter-client's ``milter_client_get_default_connection_spec``.
    """
    return ConnectionSpec.parse(DEFAULT_SPEC)
