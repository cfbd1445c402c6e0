"""A health check of a running milter: connect, negotiate as Postfix does, quit.

:func:`check_milter` is what ``milterapp check`` runs (docs/cli.md). It uses plain blocking
sockets, each step bounded by what is left of one deadline, and the sans-IO MTA side
(:class:`~milterapp.protocol.mta.MtaConnection`) for every byte it sends and reads. Every
failure is a :class:`CheckError` saying in plain words what went wrong.
"""

from __future__ import annotations

import contextlib
import math
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Final, TypeAlias

from milterapp.constants import ActionFlag, ProtocolFlag
from milterapp.errors import FrameTooLargeError, MilterError, ProtocolError
from milterapp.events import Quit
from milterapp.protocol.mta import DEFAULT_OFFER, MtaConnection
from milterapp.protocol.negotiation import SessionOptions
from milterapp.spec import ConnectionSpec

__all__ = ["CheckError", "CheckResult", "check_milter"]

#: Largest packet accepted. A negotiation reply is 13 bytes and its macro lists; with a
#: small limit, a text greeting read as a packet length ("220 ", "HTTP") is refused as soon
#: as it arrives instead of being waited for until the timeout.
_MAX_REPLY_SIZE: Final = 65535
#: How many bytes of a peer's answer an error quotes.
_QUOTED: Final = 40
_READ_SIZE: Final = 4096

#: A family, and an address for connect() in that family.
_Address: TypeAlias = tuple[socket.AddressFamily, Any]


class CheckError(MilterError):
    """The check failed. ``str()`` is ``SPEC: PROBLEM``; both are attributes too."""

    def __init__(self, spec: ConnectionSpec, problem: str) -> None:
        super().__init__(f"{spec}: {problem}")
        self.spec = spec
        self.problem = problem


@dataclass(frozen=True)
class CheckResult:
    """What the milter answered to Postfix's offer, and how long connecting and negotiating
    took (``round_trip``, in seconds)."""

    spec: ConnectionSpec
    version: int
    actions: ActionFlag
    protocol: ProtocolFlag
    round_trip: float

    def status_line(self) -> str:
        """``ok inet:10025@[127.0.0.1] version 6, actions ADDHDRS|..., protocol ..., 1.8 ms``."""
        return (
            f"ok {self.spec} version {self.version}, actions {_names(self.actions)}, "
            f"protocol {_names(self.protocol)}, {self.round_trip * 1000:.1f} ms"
        )


def _names(flags: ActionFlag | ProtocolFlag) -> str:
    """``ADDHDRS|CHGBODY``; ``none`` for no flag."""
    # Iterating a flag yields its named single bits, never aliases such as ALL. It skips bits
    # without a name: those are added in hex, so that the line hides nothing.
    names = [flag.name or "" for flag in flags]
    unnamed = int(flags) & ~sum(flags)
    if unnamed:
        names.append(hex(unnamed))
    return "|".join(names) or "none"


def check_milter(spec: str | ConnectionSpec, timeout: float = 5.0) -> CheckResult:
    """Connect to the milter at ``spec``, offer what Postfix 3.7 offers (protocol version 6,
    every action and protocol flag), read its negotiation reply, send QUIT and close.

    ``timeout`` bounds the whole check, resolving a host name included.

    Raises:
        ConnectionSpecError: ``spec`` is malformed.
        CheckError: the milter cannot be reached, did not answer in time, closed the
            connection, or answered with something that is not a negotiation reply.
        ValueError: ``timeout`` is not a finite number of seconds above 0.
    """
    if not 0 < timeout < math.inf:
        raise ValueError(f"timeout must be a finite number of seconds above 0, not {timeout}")
    target = spec if isinstance(spec, ConnectionSpec) else ConnectionSpec.parse(spec)
    deadline = time.monotonic() + timeout
    step = f"resolving {target.connect_host}"
    try:
        addresses = _addresses(target, deadline)
        step = "connecting"
        started = time.perf_counter()
        with _connect(addresses, deadline) as sock:
            step = "waiting for the negotiation reply"
            mta = MtaConnection(DEFAULT_OFFER, max_data_size=_MAX_REPLY_SIZE)
            options = _negotiate(target, sock, mta, deadline)
            round_trip = time.perf_counter() - started
            # The answer is in: a milter that stops reading now changes nothing.
            with contextlib.suppress(OSError):
                sock.sendall(mta.send(Quit()))
    except TimeoutError:
        raise CheckError(target, f"timed out after {timeout:g} s {step}") from None
    except OSError as exc:
        raise CheckError(target, _os_problem(target, exc)) from None
    return CheckResult(target, options.version, options.actions, options.protocol, round_trip)


def _left(deadline: float) -> float:
    """Seconds left before ``deadline``; TimeoutError when none are."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError
    return left


def _addresses(target: ConnectionSpec, deadline: float) -> list[_Address]:
    """Where to connect: the socket path, or the host's addresses of the spec's family."""
    if target.scheme == "unix":
        return [(socket.AF_UNIX, target.path)]
    family = socket.AF_INET6 if target.scheme == "inet6" else socket.AF_INET
    found: list[list[_Address] | OSError] = []

    def resolve() -> None:
        try:
            infos = socket.getaddrinfo(target.connect_host, target.port, family, socket.SOCK_STREAM)
            found.append([(info[0], info[4]) for info in infos])
        except OSError as exc:
            found.append(exc)

    # getaddrinfo() has no timeout of its own: a resolver that hangs is left behind in a
    # daemon thread, and the check fails on time.
    thread = threading.Thread(target=resolve, name="milterapp-check-resolve", daemon=True)
    thread.start()
    thread.join(_left(deadline))
    if not found:
        raise TimeoutError
    if isinstance(found[0], OSError):
        raise found[0]
    return found[0]


def _connect(addresses: list[_Address], deadline: float) -> socket.socket:
    """A socket connected to the first of ``addresses`` that accepts the connection."""
    error: OSError = ConnectionRefusedError("no address to connect to")
    for family, address in addresses:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.settimeout(_left(deadline))
            sock.connect(address)
        except TimeoutError:
            sock.close()
            raise
        except OSError as exc:
            sock.close()
            error = exc
        else:
            return sock
    raise error


def _negotiate(
    target: ConnectionSpec, sock: socket.socket, mta: MtaConnection, deadline: float
) -> SessionOptions:
    """Send the offer and read until the negotiation reply is whole; return what it says."""
    sock.sendall(mta.send(mta.offer))
    heard = b""  # the start of the answer, quoted when it is not a milter's
    try:
        while mta.next_reply() is None:
            sock.settimeout(_left(deadline))
            data = sock.recv(_READ_SIZE)
            if not data and not heard:
                problem = "the peer closed the connection without answering the negotiation"
                raise CheckError(target, problem)
            heard = (heard + data)[: _QUOTED + 1]
            mta.receive_data(data)
    except ProtocolError as exc:
        raise CheckError(target, _not_a_reply(heard, exc)) from None
    assert mta.options is not None  # the only reply accepted to the offer is the answer
    return mta.options


def _not_a_reply(heard: bytes, exc: ProtocolError) -> str:
    if not isinstance(exc, FrameTooLargeError) and heard[4:5] == b"O":
        # A packet of the right kind, so a milter, but one whose reply is wrong.
        return f"the milter's negotiation reply is invalid: {exc}"
    quoted = repr(heard[:_QUOTED]) + ("..." if len(heard) > _QUOTED else "")
    return f"not a milter: it answered {quoted}, which is not a milter negotiation reply"


def _os_problem(target: ConnectionSpec, exc: OSError) -> str:
    """What a failed connect, send or receive means, in plain words."""
    if isinstance(exc, FileNotFoundError):
        return "no such socket"
    if isinstance(exc, ConnectionRefusedError):
        where = "on that socket file" if target.scheme == "unix" else "on that port"
        return f"connection refused: nothing listens {where}"
    if isinstance(exc, ConnectionResetError | BrokenPipeError):
        return "the peer closed the connection (reset) without answering the negotiation"
    if isinstance(exc, PermissionError):
        return "permission denied"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve {target.connect_host}: {exc.strerror}"
    return (exc.strerror or str(exc)).lower()
