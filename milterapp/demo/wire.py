"""``milterapp demo --wire``: the protocol core, packet by packet, without sockets.

Plays the MTA's side of two SMTP transactions against a small milter, byte for byte through
the codec and both state machines, and prints the conversation.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable

from milterapp.constants import ActionFlag, ProtocolFlag
from milterapp.events import (
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
    Negotiate,
    Quit,
)
from milterapp.protocol.codec import decode_response, encode_command
from milterapp.protocol.framing import FrameDecoder
from milterapp.protocol.machine import MilterConnection
from milterapp.protocol.negotiation import Requirements, negotiate
from milterapp.replies import AddHeader, Continue, NegotiationReply, Reject, Reply

__all__ = ["run_wire_demo"]

_BLOCKED_DOMAINS = frozenset({"blocked.example"})
_NEEDS = Requirements(
    events=frozenset({"envfrom", "header"}),
    no_reply=frozenset({"header"}),
    actions=ActionFlag.ADDHDRS,
)


def _demo_milter(event: Event) -> list[Reply]:
    """The demo's filter: refuse blocked sender domains, stamp everything else."""
    if isinstance(event, EnvFrom) and event.domain in _BLOCKED_DOMAINS:
        return [Reject(code=550, xcode="5.7.1", text=f"mail from {event.domain} is refused")]
    if isinstance(event, EndOfMessage):
        return [AddHeader(name="X-Milterapp-Demo", value="checked"), Continue()]
    return [Continue()]


def _describe(event: Event) -> str:
    """One line for a person: what the MTA said, in SMTP terms where there are some."""
    match event:
        case Negotiate():
            return f"negotiate: version {event.version}, offers {event.actions!r}"
        case Macros():
            pairs = " ".join(f"{k}={v}" for k, v in event.values.items())
            return f"macros for {event.stage!r}: {pairs}"
        case Connect():
            return f"connect from {event.hostname} [{event.address}]:{event.port}"
        case Helo():
            return f"EHLO {event.name}"
        case EnvFrom():
            return f"MAIL FROM:{event.raw} {' '.join(event.args.as_strings())}"
        case EnvRcpt():
            return f"RCPT TO:{event.raw}"
        case Header():
            return f"header {event.name}: {event.value}"
        case Body():
            return f"body chunk of {len(event.chunk)} bytes"
    return type(event).__name__


def _transaction(sender: str, recipient: str, subject: str) -> list[Event]:
    headers = {"From": sender, "To": recipient, "Subject": subject}
    return [
        Macros(stage="M", values={"{mail_addr}": sender}),
        EnvFrom(address=sender, args=EsmtpArgs.parse(["SIZE=120", "BODY=8BITMIME"])),
        EnvRcpt(address=recipient),
        Data(),
        *(Header(name=name, value=value) for name, value in headers.items()),
        EndOfHeaders(),
        Body(chunk=b"Hello,\r\nthis is a sample message.\r\n"),
        EndOfMessage(),
    ]


def _session() -> list[list[Event]]:
    """The MTA's side, in groups: the MTA drops the rest of a group once it is refused."""
    return [
        [
            Negotiate(version=6, actions=ActionFlag.ALL, protocol=ProtocolFlag.ALL),
            Macros(stage="C", values={"j": "mx.example.net", "{daemon_name}": "smtpd"}),
            Connect(
                hostname="client.example.org",
                family=AddressFamily.INET,
                port=49974,
                address=ipaddress.IPv4Address("192.0.2.10"),
            ),
            Helo(name="client.example.org"),
        ],
        _transaction("alice@example.org", "bob@example.net", "Lunch?"),
        _transaction("spammer@blocked.example", "bob@example.net", "You won"),
        [Quit()],
    ]


def _exchange(conn: MilterConnection, sent: Event, write: Callable[[str], object]) -> bool:
    """Send one MTA command, print the milter's answers; return False if it refused."""
    packet = encode_command(sent)
    write(f"MTA    -> milter  {_describe(sent):<60} [{len(packet)} bytes]")
    conn.receive_data(packet)
    answered = FrameDecoder()
    while (event := conn.next_event()) is not None:
        if conn.awaiting_reply:
            answers = [negotiate(event, _NEEDS)] if isinstance(event, Negotiate) else None
            for reply in answers or _demo_milter(event):
                answered.feed(conn.send(reply))
    going_on = True
    while (frame := answered.next_frame()) is not None:
        reply = decode_response(*frame)
        write(f"milter -> MTA     {type(reply).__name__}({_reply_fields(reply)})")
        going_on = not isinstance(reply, Reject)
    return going_on


def run_wire_demo(write: Callable[[str], object] = print) -> int:
    """Play a Postfix-like MTA against the demo milter and print what crossed the wire."""
    conn = MilterConnection()
    write("milterapp demo: an MTA (Postfix-like) talks to a milter through the protocol core\n")
    for group in _session():
        for sent in group:
            if not _exchange(conn, sent, write):
                write("MTA: refused; the SMTP client is told why and this transaction ends\n")
                break
    write(
        "\nWhat happened: the first message was accepted with the header"
        " X-Milterapp-Demo added;\nthe second was refused at MAIL FROM with 550 5.7.1,"
        " and the MTA skipped the rest of it.\n\nThe first message as the MTA delivers it:"
    )
    write("  From: alice@example.org\n  To: bob@example.net\n  Subject: Lunch?")
    write("  X-Milterapp-Demo: checked\n\n  Hello,\n  this is a sample message.")
    return 0


def _reply_fields(reply: Reply) -> str:
    if isinstance(reply, NegotiationReply):
        granted = "|".join(flag.name or "" for flag in ActionFlag if flag in reply.actions)
        return f"version={reply.version}, actions={granted}, protocol=0x{reply.protocol:06x}"
    data = reply.model_dump(exclude_defaults=True, exclude={"protocol", "actions"})
    return ", ".join(f"{k}={v!r}" for k, v in data.items())
