"""What the load generator sends: the packets of a session and of a message, prepared once.

:func:`prepare` turns the commands into the writes of one connection, as Postfix would make
them after this negotiation: each write ends with a command the milter answers, commands it
does not answer go with the next one, and commands it asked not to receive are left out.
"""

from __future__ import annotations

import ipaddress
from typing import Final

from milterapp import constants
from milterapp.constants import ResponseCode
from milterapp.events import (
    Abort,
    AddressFamily,
    Body,
    Connect,
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
    Quit,
)
from milterapp.protocol.codec import encode_command
from milterapp.protocol.mta import MtaConnection

__all__ = ["ABORT", "MODIFICATIONS", "PROGRESS", "QUIT", "VERDICTS", "Script", "prepare"]

_CHUNK: Final = 65535  # Postfix's body chunk
_R = ResponseCode
#: Final answers by response byte, named as the shared C generator names them.
VERDICTS: Final = {
    **{
        code.value[0]: code.name.lower()
        for code in (_R.CONTINUE, _R.ACCEPT, _R.REJECT, _R.TEMPFAIL, _R.DISCARD, _R.REPLYCODE)
    },
    _R.SHUTDOWN.value[0]: "shutdown",
    _R.SKIP.value[0]: "skip",
    ord("f"): "connfail",  # libmilter's SMFIR_CONN_FAIL: not a reply milterapp sends
}
PROGRESS: Final = _R.PROGRESS.value[0]
#: Modifications by response byte.
MODIFICATIONS: Final = {code.value[0]: code.name.lower() for code in constants.MODIFICATIONS}
ABORT: Final = encode_command(Abort())
QUIT: Final = encode_command(Quit())


def _message(recipients: int, headers: int, body_size: int) -> list[tuple[Macros | None, Event]]:
    queue_id = {"i": "4XbQ3k1Zf2z9sVw"}
    sender = "sender@example.net"
    size = EsmtpArgs.parse([f"SIZE={body_size}"])
    body = b"The quick brown fox jumps over the lazy dog.\r\n" * (body_size // 46 + 1)
    body = body[:body_size]
    addresses = [f"rcpt{index}@example.org" for index in range(recipients)]
    return [
        (
            Macros(stage="M", values={"{mail_addr}": sender, **queue_id}),
            EnvFrom(address=sender, args=size),
        ),
        *(
            (
                Macros(stage="R", values={"{rcpt_addr}": address, **queue_id}),
                EnvRcpt(address=address),
            )
            for address in addresses
        ),
        (Macros(stage="T", values=queue_id), Data()),
        *(
            (None, Header(name=f"X-Bench-{index}", value=f"header value number {index}"))
            for index in range(headers)
        ),
        (Macros(stage="N", values=queue_id), EndOfHeaders()),
        *((None, Body(chunk=body[at : at + _CHUNK])) for at in range(0, len(body), _CHUNK)),
        (Macros(stage="E", values=queue_id), EndOfMessage()),
    ]


_SETUP: Final[list[tuple[Macros | None, Event]]] = [
    (
        Macros(stage="C", values={"j": "mx.example.org", "{daemon_name}": "smtpd", "v": "Postfix"}),
        Connect(
            hostname="client.example.com",
            family=AddressFamily.INET,
            port=40000,
            address=ipaddress.IPv4Address("192.0.2.10"),
        ),
    ),
    (Macros(stage="H", values={}), Helo(name="client.example.com")),
]


Script = list[tuple[bytes, bool]]


def _script(mta: MtaConnection, steps: list[tuple[Macros | None, Event]]) -> Script:
    """Writes for ``steps``, each with whether the milter answers it. Commands it does not
    answer go with the next one; commands it does not want are left out."""
    writes: Script = []
    pending = b""
    for macros, event in steps:
        if mta.suppressed(event):
            continue
        if macros is not None:
            pending += encode_command(macros)
        pending += encode_command(event)
        if mta.expects_reply(event):
            writes.append((pending, True))
            pending = b""
    if pending:
        writes.append((pending, False))
    return writes


def prepare(
    mta: MtaConnection, *, recipients: int, headers: int, body_size: int
) -> tuple[Script, Script]:
    """The writes of a session's start (connect, helo) and of one message, for ``mta``'s
    negotiated options."""
    return _script(mta, _SETUP), _script(mta, _message(recipients, headers, body_size))
