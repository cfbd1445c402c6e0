"""Limits on what one MTA connection may cost, and the replies given when one is hit.

The deadlines protect the server from slow or stuck peers; the counts protect it from
messages built to exhaust memory. :class:`Limits` is the one place that names each limit, its
default and what it does: the server options hold it, and the command line builds its flags
from its fields. The connection applies the deadlines, the responder the counts.
"""

from __future__ import annotations

from typing import Final

from pydantic import BaseModel, ConfigDict, Field

from milterapp.replies import TempFail

__all__ = [
    "HEADER_TOO_LARGE",
    "TOO_MANY_HEADERS",
    "TOO_MANY_RECIPIENTS",
    "Limits",
]

# The replies when a limit is hit. Temporary: the limits protect this milter's resources, the
# mail itself may be fine (and a milter fails closed: nothing passes unchecked). 452 with
# X.5.3 is the SMTP answer to one recipient too many (RFC 5321 4.5.3.1.10, RFC 3463); 452
# ("insufficient system storage") with X.3.4 ("message too big for system") says a message
# is over what the system takes, temporarily.
TOO_MANY_RECIPIENTS: Final = TempFail(code=452, xcode="4.5.3", text="too many recipients")
TOO_MANY_HEADERS: Final = TempFail(code=452, xcode="4.3.4", text="too many headers")
HEADER_TOO_LARGE: Final = TempFail(code=452, xcode="4.3.4", text="header too large")


class Limits(BaseModel):
    """What one connection may cost. Every limit but ``timeout`` is off when 0.

    A message over a count is answered at the command that went over it if the MTA expects a
    reply to it, else at the next of its commands that does (at the latest, end of message);
    its handlers no longer run, and the connection goes on with the next message. Every limit
    hit is logged as ``limit_exceeded`` with the limit's name and value. Each field's
    description is also its help text on the command line.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    timeout: float = Field(
        default=7210.0,  # libmilter's, which milter-client also uses: two hours and ten seconds
        gt=0,
        description="seconds a connection may stay idle between commands before it is closed",
    )
    read_timeout: float = Field(
        default=60.0,
        ge=0,
        description="seconds a command may take to arrive whole once its first byte came "
        "(a peer trickling bytes is dropped, logged as read_timeout); 0: no limit",
    )
    write_timeout: float = Field(
        default=60.0,
        ge=0,
        description="seconds the MTA may leave our replies unread before the connection is "
        "dropped (logged as write_timeout); 0: no limit",
    )
    max_macros_per_packet: int = Field(
        default=256,
        ge=0,
        description="most macros in one D packet; more is a protocol error that closes the "
        "connection",
    )
    max_headers: int = Field(
        default=1000,
        ge=0,
        description="most headers per message; the message is then tempfailed "
        '(452 4.3.4 "too many headers")',
    )
    max_header_size: int = Field(
        default=256 * 1024,
        ge=0,
        description="largest header in bytes, name and value; a larger one tempfails its "
        'message (452 4.3.4 "header too large")',
    )
    max_recipients: int = Field(
        default=1000,
        ge=0,
        description="most recipients per message; each one above is tempfailed "
        '(452 4.5.3 "too many recipients") and not added to ctx.message.recipients',
    )
