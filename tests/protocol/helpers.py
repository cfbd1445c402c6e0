"""Helpers shared by the state machine tests: wire bytes, negotiated connections, sessions.

Not a test module. ``postfix_session`` is written after what Postfix 3.x sends with its default
macro lists (protocol reference §3, §7, §8): a ``D`` packet before every event, with the letter
of that event, and an ``A`` after every message.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable

from milterapp.constants import ActionFlag, ConnectionState, ProtocolFlag
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
from milterapp.replies import Continue, Reply

__all__ = [
    "POSTFIX_OFFER",
    "Answer",
    "decode_responses",
    "drive",
    "negotiated_connection",
    "postfix_body",
    "postfix_session",
    "wire",
]

#: What Postfix >= 2.6 (milter_protocol = 6) and Sendmail 8.14+ offer.
POSTFIX_OFFER = Negotiate(version=6, actions=ActionFlag.ALL, protocol=ProtocolFlag.ALL)

#: A reply for every event, or a function choosing it from the event.
Answer = Reply | Callable[[Event], Reply]


def wire(*events: Event) -> bytes:
    """Return the packets the MTA sends for ``events``, back to back."""
    return b"".join(encode_command(event) for event in events)


def decode_responses(data: bytes) -> list[Reply]:
    """Decode every milter response packet in ``data``, as the MTA would read them."""
    frames = FrameDecoder(max_data_size=2**31)
    frames.feed(data)
    replies = []
    while (frame := frames.next_frame()) is not None:
        replies.append(decode_response(*frame))
    assert frames.buffered == 0, "trailing bytes after the last packet"
    return replies


def negotiated_connection(
    needs: Requirements | None = None,
    offer: Negotiate = POSTFIX_OFFER,
    *,
    max_data_size: int | None = None,
    macro_events: bool = True,
) -> MilterConnection:
    """Return a connection that has negotiated ``needs`` against ``offer`` (CONNECT comes next)."""
    conn = MilterConnection(max_data_size=max_data_size, macro_events=macro_events)
    conn.receive_data(encode_command(offer))
    assert conn.next_event() == offer
    assert conn.pending_command == "O"
    conn.send(negotiate(offer, needs or Requirements()))
    assert conn.state is ConnectionState.CONNECTING
    assert not conn.awaiting_reply
    return conn


def _default_answer(event: Event) -> Reply:
    if isinstance(event, Negotiate):
        return negotiate(event, Requirements())
    return Continue()


def drive(
    conn: MilterConnection,
    data: bytes,
    answer: Answer = _default_answer,
    *,
    sent: list[tuple[Reply, bytes]] | None = None,
) -> list[Event]:
    """Feed ``data``, pull every event and answer each one that waits for a reply.

    The default answer is Continue (and, to an ``O``, the negotiation reply for default
    Requirements). Each reply and the bytes ``send`` returned for it are appended to ``sent``.
    As with :meth:`MilterConnection.receive_data`, ``data=b""`` means end of file.
    """
    conn.receive_data(data)
    events: list[Event] = []
    while (event := conn.next_event()) is not None:
        events.append(event)
        if conn.awaiting_reply:
            reply = answer(event) if callable(answer) else answer
            out = conn.send(reply)
            if sent is not None:
                sent.append((reply, out))
            assert not conn.awaiting_reply
    return events


def postfix_body(size: int) -> bytes:
    """Return a CRLF body of exactly ``size`` bytes (ending in CRLF when ``size`` >= 2)."""
    line = b"The quick brown fox jumps over the lazy dog. 0123456789\r\n"
    body = line * (size // len(line) + 1)
    return body[: size - 2] + b"\r\n" if size >= 2 else body[:size]


def _message(number: int, queue_id: str, body_size: int) -> list[Event]:
    sender = f"alice{number}@example.org"
    rcpts = [f"bob{number}@example.net", f"carol{number}@example.net"]
    body = postfix_body(body_size)
    # Postfix sends full 65535-byte chunks, then the rest before the (empty) end of message.
    chunks = [body[:65535], body[65535:]]
    eoh = {"i": queue_id}
    events: list[Event] = [
        # i is assigned only after the first accepted RCPT, so it is absent here (§8).
        Macros(
            stage="M",
            values={
                "{mail_addr}": sender,
                "{mail_host}": "example.org",
                "{mail_mailer}": "smtp",
            },
        ),
        EnvFrom(address=sender, args=[f"SIZE={body_size + 200}", "BODY=8BITMIME"]),
    ]
    for index, rcpt in enumerate(rcpts):
        values = {"{rcpt_addr}": rcpt, "{rcpt_host}": "mx.example.net", "{rcpt_mailer}": "smtp"}
        if index:
            values = {"i": queue_id, **values}
        events += [Macros(stage="R", values=values), EnvRcpt(address=rcpt)]
    events += [Macros(stage="T", values=eoh), Data()]
    headers = [
        Header(name="From", value=f"Alice <{sender}>"),
        Header(name="To", value=f"{rcpts[0]},\n\t{rcpts[1]}"),  # folded: bare LF + tab
        Header(name="Subject", value=f"Test message {number}"),
        Header(name="Date", value="Mon, 24 Nov 2025 18:00:00 +0000"),
        Header(name="Message-ID", value=f"<{queue_id}.{number}@example.org>"),
        Header(name="MIME-Version", value="1.0"),
        Header(name="Content-Type", value="text/plain; charset=utf-8"),
    ]
    for header in headers:
        events += [Macros(stage="L", values=eoh), header]
    events += [Macros(stage="N", values=eoh), EndOfHeaders()]
    for chunk in chunks:
        events += [Macros(stage="B", values=eoh), Body(chunk=chunk)]
    events += [Macros(stage="E", values=eoh), EndOfMessage()]
    events.append(Abort())  # Postfix resets its milters after every message
    return events


def postfix_session(*, body_size: int = 70_000) -> list[Event]:
    """Return a whole Postfix SMTP session as MTA events, from ``O`` to ``Q``.

    Two complete messages (each followed by the ``A`` Postfix sends after every message) with a
    transaction aborted after its first RCPT (RSET) in between. Each body is ``body_size``
    bytes, sent as a 65535-byte chunk and the rest.
    """
    events: list[Event] = [
        POSTFIX_OFFER,
        Macros(
            stage="C",
            values={
                "j": "mx.example.net",
                "{daemon_name}": "smtpd",
                "{daemon_addr}": "192.0.2.25",
                "v": "Postfix 3.7.11",
                "_": "mail.example.com [198.51.100.7]",
            },
        ),
        Connect(
            hostname="mail.example.com",
            family=AddressFamily.INET,
            port=49974,
            address=ipaddress.IPv4Address("198.51.100.7"),
        ),
        Macros(stage="H", values={}),  # no TLS: Postfix still sends the (empty) D packet
        Helo(name="mail.example.com"),
    ]
    events += _message(1, "4Xy1Zk0Q1Bz9sTn", body_size)
    events += [
        Macros(stage="M", values={"{mail_addr}": "mallory@example.com"}),
        EnvFrom(address="mallory@example.com", args=["SIZE=1000"]),
        Macros(stage="R", values={"{rcpt_addr}": "dave@example.net"}),
        EnvRcpt(address="dave@example.net"),
        Abort(),  # RSET in the middle of the transaction
    ]
    events += _message(2, "4Xy1Zm2R3Cz9sTp", body_size)
    events.append(Quit())
    return events
