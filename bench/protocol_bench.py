"""Protocol core benchmark: microseconds per typical transaction.

A transaction as Postfix sends it: macros before each stage, MAIL with one ESMTP argument,
2 RCPT, DATA, 10 headers, end of headers, a 4 KiB body, end of message. Three figures:

* decode: frame and decode every MTA packet (codec only);
* milter side: the whole transaction through MilterConnection, answering every command that
  needs a reply (Continue; at end of message an added header and Accept);
* MTA side: encode every command and decode the milter's replies.

Run: ``python bench/protocol_bench.py [--transactions N]``. A benchmark, not a test: compare
figures taken in one run on one machine.
"""

from __future__ import annotations

import argparse
import ipaddress
import platform
import time
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
)
from milterapp.protocol.codec import (
    decode_command,
    decode_response,
    encode_command,
    encode_response,
)
from milterapp.protocol.framing import FrameDecoder
from milterapp.protocol.machine import MilterConnection
from milterapp.protocol.negotiation import Requirements, negotiate
from milterapp.replies import Accept, AddHeader, Continue, Reply

OFFER = Negotiate(version=6, actions=ActionFlag.ALL, protocol=ProtocolFlag.ALL)
SETUP: list[Event] = [
    OFFER,
    Macros(stage="C", values={"j": "mx.example.net", "{daemon_name}": "smtpd", "v": "Postfix"}),
    Connect(
        hostname="client.example.org",
        family=AddressFamily.INET,
        port=49974,
        address=ipaddress.IPv4Address("192.0.2.10"),
    ),
    Macros(stage="H", values={}),
    Helo(name="client.example.org"),
]


def transaction(body_size: int = 4096) -> list[Event]:
    """One message as Postfix sends it, macros included; the body in chunks of 65,535 bytes."""
    headers = [Header(name=f"X-Header-{i}", value=f"value number {i} " * 3) for i in range(10)]
    line = b"Lorem ipsum dolor sit amet, consectetur adipiscing elit.\r\n"
    body = (line * (body_size // len(line) + 1))[:body_size]
    events: list[Event] = [
        Macros(stage="M", values={"{mail_addr}": "alice@example.org", "{mail_mailer}": "smtp"}),
        EnvFrom(address="alice@example.org", args=EsmtpArgs.parse(["SIZE=4500"])),
        Macros(stage="R", values={"{rcpt_addr}": "bob@example.net", "i": "4XyZ1"}),
        EnvRcpt(address="bob@example.net"),
        Macros(stage="R", values={"{rcpt_addr}": "carol@example.net", "i": "4XyZ1"}),
        EnvRcpt(address="carol@example.net"),
        Macros(stage="T", values={"i": "4XyZ1"}),
        Data(),
    ]
    for header in headers:
        events += [Macros(stage="L", values={"i": "4XyZ1"}), header]
    events += [
        Macros(stage="N", values={"i": "4XyZ1"}),
        EndOfHeaders(),
        Macros(stage="B", values={"i": "4XyZ1"}),
        *(Body(chunk=body[at : at + 65535]) for at in range(0, len(body), 65535)),
        Macros(stage="E", values={"i": "4XyZ1"}),
        EndOfMessage(),
    ]
    return events


def wire(events: list[Event]) -> bytes:
    return b"".join(encode_command(e) for e in events)


def bench(name: str, run: Callable[[], None], count: int, rounds: int = 5) -> float:
    """Print the best of ``rounds`` timings: the least disturbed by other load."""
    run()  # warm up
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(count):
            run()
        best = min(best, (time.perf_counter() - start) / count * 1e6)
    print(f"{name:<44} {best:9.1f} us/transaction")
    return best


def decode_only(data: bytes) -> Callable[[], None]:
    def run() -> None:
        frames = FrameDecoder()
        frames.feed(data)
        while (frame := frames.next_frame()) is not None:
            decode_command(*frame)

    return run


def milter_side(setup: bytes, data: bytes, needs: Requirements) -> Callable[[], None]:
    def answer(conn: MilterConnection) -> None:
        while (event := conn.next_event()) is not None:
            if not conn.awaiting_reply:
                continue
            if isinstance(event, Negotiate):
                conn.send(negotiate(event, needs))
            elif isinstance(event, EndOfMessage):
                conn.send(AddHeader(name="X-Checked", value="yes"))
                conn.send(Accept())
            else:
                conn.send(Continue())

    conn = MilterConnection()
    conn.receive_data(setup)
    answer(conn)

    def run() -> None:
        conn.receive_data(data)
        answer(conn)

    return run


def mta_side(events: list[Event], replies: list[Reply]) -> Callable[[], None]:
    answers = b"".join(encode_response(r) for r in replies)

    def run() -> None:
        for event in events:
            encode_command(event)
        frames = FrameDecoder()
        frames.feed(answers)
        while (frame := frames.next_frame()) is not None:
            decode_response(*frame)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--transactions", type=int, default=2000)
    count = parser.parse_args().transactions
    events = transaction()
    data = wire(events)
    print(f"python {platform.python_version()} on {platform.machine()}, best of 5 x {count}")
    print(f"transaction: {len(events)} packets, {len(data)} bytes\n")
    bench("decode (framing + codec)", decode_only(data), count)
    all_events = Requirements()
    bench("milter side, every event answered", milter_side(wire(SETUP), data, all_events), count)
    # An app with only an end-of-message handler: the MTA sends the macros (it always does)
    # and end of message, and suppresses every other event.
    eom_only = Requirements(events=frozenset(), actions=ActionFlag.ADDHDRS)
    eom_wire = wire([e for e in events if isinstance(e, Macros | EndOfMessage)])
    bench(
        "milter side, end-of-message-only app", milter_side(wire(SETUP), eom_wire, eom_only), count
    )
    replies: list[Reply] = [Continue()] * 16 + [AddHeader(name="X-Checked", value="yes"), Accept()]
    bench("MTA side (encode commands, decode replies)", mta_side(events, replies), count)


if __name__ == "__main__":
    main()
