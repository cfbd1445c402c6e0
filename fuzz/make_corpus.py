"""Write the seed corpus of fuzz_decoder.py into fuzz/corpus/ (run from the repository root).

Each file is one input of the target: a set-up byte, then what the MTA sends (see
fuzz_decoder.py). Valid sessions under several set-ups, and known-malformed inputs.
Re-running rewrites the same files.
"""

from __future__ import annotations

import ipaddress
import struct
from pathlib import Path

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
    Quit,
    QuitNoClose,
    Unknown,
)
from milterapp.protocol.codec import encode_command
from milterapp.protocol.framing import encode_frame
from milterapp.protocol.mta import DEFAULT_OFFER

CORPUS = Path(__file__).parent / "corpus"

CLIENT = Connect(
    hostname="client.example.com",
    family=AddressFamily.INET,
    port=41234,
    address=ipaddress.ip_address("192.0.2.10"),
)
CLIENT6 = Connect(
    hostname="v6.example.com",
    family=AddressFamily.INET6,
    port=25,
    address=ipaddress.ip_address("2001:db8::1"),
)
MESSAGE: list[Event] = [
    Macros(stage="M", values={"i": "4F2A1C"}),
    EnvFrom.from_raw("<alice@example.org>", ["SIZE=1234", "BODY=8BITMIME"]),
    Macros(stage="R", values={"{rcpt_addr}": "bob@example.net"}),
    EnvRcpt(address="bob@example.net"),
    EnvRcpt.from_raw("<carol@example.net>", ["NOTIFY=NEVER"]),
    Data(),
    Header(name="From", value="alice@example.org"),
    Header(name="Subject", value=" hello"),
    EndOfHeaders(),
    Body(chunk=b"Hello, Bob.\r\n"),
    Body(chunk=b"Bye.\r\n"),
    Macros(stage="E", values={"{msg_id}": "<1@example.org>"}),
    EndOfMessage(),
    Abort(),
]
SESSION: list[Event] = [
    Macros(stage="C", values={"j": "mx.example.org", "{client_addr}": "192.0.2.10"}),
    CLIENT,
    Helo(name="client.example.com"),
    Unknown(line="XFOO bar"),
    *MESSAGE,
    *MESSAGE[:4],
    Abort(),
    QuitNoClose(),
    CLIENT6,
    Helo(name="again.example.com"),
    *MESSAGE,
    Quit(),
]


def wire(events: list[Event]) -> bytes:
    return b"".join(encode_command(event) for event in events)


def main() -> None:
    session = wire(SESSION)
    offer = encode_command(DEFAULT_OFFER)
    inputs: dict[str, bytes] = {
        # Valid sessions: negotiated by the harness, split in several ways, several set-ups.
        "valid-whole": b"\x00" + session,
        "valid-bytewise": b"\x01" + session,
        "replies-by7": b"\x42" + session,
        "valid-growing-leadspc": b"\x2b" + session,
        "valid-few-events": b"\x04" + session,
        "valid-noreply-rcpt": b"\x0c" + session,
        "valid-small-limit": b"\x80" + session,
        "valid-v2-offer": b"\x20" + wire([CLIENT, Helo(name="h"), *MESSAGE, Quit()]),
        # The stream negotiates itself.
        "raw-with-offer": b"\x10" + offer + session,
        "raw-offer-v1": b"\x10" + bytes.fromhex("0000000d 4f 00000001 0000001f 0000003f"),
        "raw-offer-bad-version": b"\x50" + bytes.fromhex("0000000d 4f 00000000 000001ff 001fffff"),
        # Known-malformed input.
        "length-zero": b"\x00" + b"\x00\x00\x00\x00",
        "length-huge": b"\x00" + b"\xff\xff\xff\xff" + b"C",
        "length-off-by-one": b"\x00" + struct.pack("!I", len(session) + 1) + session[4:],
        "truncated": b"\x00" + session[: len(session) // 2],
        "garbage": b"\x03" + bytes(range(256)),
        "unknown-command": b"\x00" + encode_frame(b"Z", b"zzz"),
        "connect-bad-family": b"\x00" + encode_frame(b"C", b"h\x00X\x00\x19a\x00"),
        "connect-bad-ipv6": b"\x00" + encode_frame(b"C", b"h\x006\x00\x192001:db8:::1\x00"),
        "macro-odd-strings": b"\x00" + encode_frame(b"D", b"Cj\x00"),
        "header-unterminated": b"\x00" + wire([CLIENT, *MESSAGE[:6]]) + encode_frame(b"L", b"X"),
        "body-before-mail": b"\x00" + wire([CLIENT, Body(chunk=b"x")]),
        "second-offer": b"\x00" + offer,
        "responses": b"\x00"
        + encode_frame(b"y", b"550 5.7.1 no\x00")
        + encode_frame(b"i", b"\x00\x00\x00\x01X\x00v\x00")
        + encode_frame(b"h", b"X:Y\x00v\x00")
        + encode_frame(b"O", bytes.fromhex("00000006 000001ff 001fffff")),
    }
    CORPUS.mkdir(exist_ok=True)
    for name, data in inputs.items():
        (CORPUS / name).write_bytes(data)
    print(f"wrote {len(inputs)} files to {CORPUS}")


if __name__ == "__main__":
    main()
