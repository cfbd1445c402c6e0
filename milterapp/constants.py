"""Wire constants of the milter protocol, versions 2 to 6.

Values are those of Sendmail's ``mfdef.h`` and Postfix's ``milter8.c``; section numbers in
comments refer to ``docs/protocol-reference.md``, the protocol reference.
"""

from __future__ import annotations

import enum
from typing import Final

__all__ = [
    "ALL_COMMANDS",
    "DEFAULT_MAX_DATA_SIZE",
    "MAX_DATA_SIZE_1M",
    "MAX_DATA_SIZE_256K",
    "MAX_REPLY_LINES",
    "MAX_REPLY_LINE_LENGTH",
    "MAX_VERSION",
    "MIN_VERSION",
    "MODIFICATIONS",
    "ActionFlag",
    "Command",
    "ConnectionState",
    "MacroStage",
    "ProtocolFlag",
    "ResponseCode",
    "max_data_size_for",
]

#: Lowest protocol version we speak; libmilter treats anything lower as fatal.
MIN_VERSION: Final = 2
#: Highest protocol version defined (Sendmail 8.14+, Postfix 2.6+).
MAX_VERSION: Final = 6

#: Largest payload (command byte excluded) either side sends unless more was negotiated (§1).
DEFAULT_MAX_DATA_SIZE: Final = 65535
MAX_DATA_SIZE_256K: Final = 262143
MAX_DATA_SIZE_1M: Final = 1048575

#: libmilter's limits for a multi-line reply (§5).
MAX_REPLY_LINES: Final = 32
MAX_REPLY_LINE_LENGTH: Final = 980


class Command(bytes, enum.Enum):
    """Command bytes the MTA sends to the milter (§3)."""

    OPTNEG = b"O"
    MACRO = b"D"
    CONNECT = b"C"
    HELO = b"H"
    MAIL = b"M"
    RCPT = b"R"
    DATA = b"T"
    HEADER = b"L"
    EOH = b"N"
    BODY = b"B"
    BODYEOB = b"E"
    UNKNOWN = b"U"
    ABORT = b"A"
    QUIT = b"Q"
    QUIT_NC = b"K"


#: Every command byte the MTA sends, as integers (what indexing a packet gives), in the order
#: of :class:`Command`.
ALL_COMMANDS: Final = tuple(command.value[0] for command in Command)


class ResponseCode(bytes, enum.Enum):
    """Response bytes the milter sends to the MTA (§4)."""

    OPTNEG = b"O"
    CONTINUE = b"c"
    ACCEPT = b"a"
    REJECT = b"r"
    TEMPFAIL = b"t"
    DISCARD = b"d"
    REPLYCODE = b"y"
    SKIP = b"s"
    PROGRESS = b"p"
    ADDHEADER = b"h"
    INSHEADER = b"i"
    CHGHEADER = b"m"
    ADDRCPT = b"+"
    ADDRCPT_PAR = b"2"
    DELRCPT = b"-"
    CHGFROM = b"e"
    REPLBODY = b"b"
    QUARANTINE = b"q"
    SHUTDOWN = b"4"


#: The responses that change the message: sent during end of message, before its verdict.
MODIFICATIONS: Final = (
    ResponseCode.ADDHEADER,
    ResponseCode.INSHEADER,
    ResponseCode.CHGHEADER,
    ResponseCode.ADDRCPT,
    ResponseCode.ADDRCPT_PAR,
    ResponseCode.DELRCPT,
    ResponseCode.CHGFROM,
    ResponseCode.REPLBODY,
    ResponseCode.QUARANTINE,
)


class ActionFlag(enum.IntFlag):
    """What the milter may do at end of message (SMFIF_*, §2)."""

    NONE = 0
    ADDHDRS = 0x001
    CHGBODY = 0x002
    ADDRCPT = 0x004
    DELRCPT = 0x008
    CHGHDRS = 0x010
    QUARANTINE = 0x020
    CHGFROM = 0x040
    ADDRCPT_PAR = 0x080
    SETSYMLIST = 0x100

    V1 = 0x0F
    V2 = 0x3F
    ALL = 0x1FF


class ProtocolFlag(enum.IntFlag):
    """Events to suppress and features to use (SMFIP_*, §2)."""

    NONE = 0
    NOCONNECT = 0x000001
    NOHELO = 0x000002
    NOMAIL = 0x000004
    NORCPT = 0x000008
    NOBODY = 0x000010
    NOHDRS = 0x000020
    NOEOH = 0x000040
    NR_HDR = 0x000080
    NOUNKNOWN = 0x000100
    NODATA = 0x000200
    SKIP = 0x000400
    RCPT_REJ = 0x000800
    NR_CONN = 0x001000
    NR_HELO = 0x002000
    NR_MAIL = 0x004000
    NR_RCPT = 0x008000
    NR_DATA = 0x010000
    NR_UNKN = 0x020000
    NR_EOH = 0x040000
    NR_BODY = 0x080000
    HDR_LEADSPC = 0x100000
    MDS_256K = 0x10000000
    MDS_1M = 0x20000000

    V1 = 0x3F
    V2 = 0x7F
    ALL = 0x1FFFFF
    #: Bits Sendmail strips before its subset check (SMFI_INTERNAL).
    INTERNAL = 0x70000000


class MacroStage(enum.IntEnum):
    """Stages a macro list can be requested for in the negotiation reply (SMFIM_*, §2).

    Note the order: end of message (5) comes before end of headers (6) on the wire.
    """

    CONNECT = 0
    HELO = 1
    ENVFROM = 2
    ENVRCPT = 3
    DATA = 4
    EOM = 5
    EOH = 6


class ConnectionState(enum.Enum):
    """Where a milter connection stands (§7)."""

    NEGOTIATING = "negotiating"  # waiting for the MTA's O, or our answer to it
    CONNECTING = "connecting"  # negotiated; CONNECT (or what follows it) comes next
    SESSION = "session"  # connected; no message open
    MESSAGE = "message"  # a message is open
    DONE = "done"  # a connection-level verdict was given; only quit/abort/macros follow
    CLOSED = "closed"  # quit or end of file
    ERROR = "error"  # the MTA broke the protocol


def max_data_size_for(protocol: ProtocolFlag) -> int:
    """Return the largest payload size that the MDS bits in ``protocol`` allow."""
    if protocol & ProtocolFlag.MDS_1M:
        return MAX_DATA_SIZE_1M
    if protocol & ProtocolFlag.MDS_256K:
        return MAX_DATA_SIZE_256K
    return DEFAULT_MAX_DATA_SIZE
