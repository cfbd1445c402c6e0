"""Limits on what one MTA connection may cost, and the replies given when one is hit.

Each limit is off when 0. The deadlines protect the server from slow or stuck peers; the
counts protect it from messages built to exhaust memory. The connection handler applies
them (:mod:`milterapp.session`); the server's options set them (:mod:`milterapp.server`).
"""

from __future__ import annotations

import dataclasses
from typing import Final

from milterapp.events import Header
from milterapp.replies import TempFail

__all__ = [
    "DEFAULT_MAX_HEADERS",
    "DEFAULT_MAX_HEADER_SIZE",
    "DEFAULT_MAX_MACROS_PER_PACKET",
    "DEFAULT_MAX_RECIPIENTS",
    "DEFAULT_READ_TIMEOUT",
    "DEFAULT_TIMEOUT",
    "DEFAULT_WRITE_TIMEOUT",
    "HEADER_TOO_LARGE",
    "TOO_MANY_HEADERS",
    "TOO_MANY_RECIPIENTS",
    "Limits",
    "header_size",
]

DEFAULT_MAX_MACROS_PER_PACKET: Final = 256
DEFAULT_MAX_HEADERS: Final = 1000
DEFAULT_MAX_HEADER_SIZE: Final = 256 * 1024
DEFAULT_MAX_RECIPIENTS: Final = 1000
#: Seconds between commands before an idle connection is closed (libmilter's default, which
#: milter-client also uses: two hours and ten seconds).
DEFAULT_TIMEOUT: Final = 7210.0
#: Seconds a command may take to arrive whole once its first byte came.
DEFAULT_READ_TIMEOUT: Final = 60.0
#: Seconds the MTA may leave our replies unread before the connection is dropped.
DEFAULT_WRITE_TIMEOUT: Final = 60.0

# The replies when a limit is hit. Temporary: the limits protect this milter's resources, the
# mail itself may be fine (and a milter fails closed: nothing passes unchecked). 452 with
# X.5.3 is the SMTP answer to one recipient too many (RFC 5321 4.5.3.1.10, RFC 3463); 452
# ("insufficient system storage") with X.3.4 ("message too big for system") says a message
# is over what the system takes, temporarily.
TOO_MANY_RECIPIENTS: Final = TempFail(code=452, xcode="4.5.3", text="too many recipients")
TOO_MANY_HEADERS: Final = TempFail(code=452, xcode="4.3.4", text="too many headers")
HEADER_TOO_LARGE: Final = TempFail(code=452, xcode="4.3.4", text="header too large")


@dataclasses.dataclass(frozen=True, slots=True)
class Limits:
    """What one connection may cost; every field is off when 0.

    Attributes:
        timeout: seconds the MTA may stay silent between commands (the idle deadline).
        read_timeout: seconds a command may take to arrive whole once its first byte came;
            a peer that trickles bytes (slowloris) is dropped.
        write_timeout: seconds our replies may wait unread by the MTA (its receive window
            full); a peer that stops reading is dropped.
        max_macros_per_packet: most name/value pairs in one ``D`` packet; more is a protocol
            error that closes the connection.
        max_headers: most headers per message; the next one tempfails the message.
        max_header_size: largest header (name and value, in bytes); a larger one tempfails
            the message.
        max_recipients: most recipients per message; each one above is tempfailed alone.
    """

    timeout: float = DEFAULT_TIMEOUT
    read_timeout: float = DEFAULT_READ_TIMEOUT
    write_timeout: float = DEFAULT_WRITE_TIMEOUT
    max_macros_per_packet: int = DEFAULT_MAX_MACROS_PER_PACKET
    max_headers: int = DEFAULT_MAX_HEADERS
    max_header_size: int = DEFAULT_MAX_HEADER_SIZE
    max_recipients: int = DEFAULT_MAX_RECIPIENTS

    def __post_init__(self) -> None:
        for name in _LIMIT_NAMES:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise ValueError(f"{name}: must be a number, at least 0 (not {value!r})")


_LIMIT_NAMES: Final = tuple(field.name for field in dataclasses.fields(Limits))


def header_size(event: Header, limit: int) -> int:
    """The header's size in bytes as received, computed exactly only near ``limit``."""
    size = len(event.name) + len(event.value)  # characters: at least a quarter of the bytes
    if 4 * size <= limit:
        return size
    return len(event.raw_name) + len(event.raw_value)
