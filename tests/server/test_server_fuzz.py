"""Hostile input over real sockets: thousands of mutated sessions against one running server.

A realistic session (negotiation, connect, HELO, a message with macros, headers, body and end
of message, an abort, QUIT) is encoded once; deterministic mutants of it (bytes flipped,
truncated, ranges repeated, random bytes inserted, length prefixes set to 0, huge or off by
one, packets swapped, dropped or repeated, plain garbage) go to ONE server over many
concurrent connections. Each mutant must end: the server answers and closes, or closes on its
own idle timeout; never a hang. Every chunk of mutants, a normal message must still get its
modifications and Continue. At the end no connection, task or file descriptor is left over,
memory is bounded, and no connection ended in a crash of ours (``connection_failed``).

Failures name the seed and the mutant index; set ``MILTERAPP_FUZZ_SEED`` to replay a seed.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import ipaddress
import os
import random
import socket
import struct
import time
from collections import Counter
from collections.abc import Callable
from typing import Any, Final

import structlog

from milterapp.app import App
from milterapp.context import Context
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
from milterapp.protocol.mta import DEFAULT_OFFER
from milterapp.replies import AddHeader, AddRecipient, ChangeHeader, Continue, Reject
from milterapp.server import MilterServer
from tests.server.support import connect, run, send_message, start_session

#: The seed of every mutant; a failure names it (and the mutant's index) to replay it.
SEED: Final = int(os.environ.get("MILTERAPP_FUZZ_SEED", "20261124"))
#: Mutants sent in all, in chunks; a normal message goes through after each chunk.
MUTANTS: Final = 2000
CHUNK: Final = 200
#: Connections open at once.
CONCURRENCY: Final = 50
#: The server's idle timeout: a mutant that stops short without closing ends by it.
SERVER_IDLE_TIMEOUT: Final = 1.0
#: Bound of one mutant connection, end to end: well above the idle timeout.
MUTANT_TIMEOUT: Final = 10.0
#: Bound of the whole test body.
FUZZ_TIMEOUT: Final = 55.0
#: Allowed growth at the end.
RSS_MARGIN: Final = 50 * 1024 * 1024
FD_MARGIN: Final = 3

_LENGTH: Final = struct.Struct("!I")

CLIENT: Final = Connect(
    hostname="client.example.com",
    family=AddressFamily.INET,
    port=41234,
    address=ipaddress.ip_address("192.0.2.10"),
)


def session_events() -> list[Event]:
    """A realistic session, as Postfix sends it (every command, none suppressed)."""
    return [
        DEFAULT_OFFER,
        Macros(stage="C", values={"j": "mx.example.org", "{client_addr}": "192.0.2.10"}),
        CLIENT,
        Macros(stage="H", values={"{tls_version}": "TLSv1.3"}),
        Helo(name="client.example.com"),
        Unknown(line="XFOO bar"),
        Macros(stage="M", values={"i": "4F2A1C", "{mail_addr}": "alice@example.org"}),
        EnvFrom.from_raw("<alice@example.org>", ["SIZE=1234", "BODY=8BITMIME"]),
        Macros(stage="R", values={"{rcpt_addr}": "bob@example.net"}),
        EnvRcpt(address="bob@example.net"),
        EnvRcpt.from_raw("<carol@example.net>", ["NOTIFY=NEVER"]),
        Data(),
        Header(name="From", value="alice@example.org"),
        Header(name="Subject", value="hello"),
        Header(name="X-Long", value="x" * 300),
        EndOfHeaders(),
        Body(chunk=b"Hello, Bob.\r\n" * 20),
        Body(chunk=b"Bye.\r\n"),
        Macros(stage="E", values={"{msg_id}": "<1@example.org>"}),
        EndOfMessage(),
        Abort(),
        Macros(stage="M", values={"i": "5B3D2E"}),
        EnvFrom(address="dave@example.org"),
        EnvRcpt(address="bob@example.net"),
        Abort(),
        QuitNoClose(),
        Macros(stage="C", values={"j": "mx.example.org"}),
        CLIENT,
        Helo(name="again.example.com"),
        Quit(),
    ]


PACKETS: Final = [encode_command(event) for event in session_events()]
SESSION: Final = b"".join(PACKETS)


# --- mutants ---------------------------------------------------------------------------------


def _packet_offsets(packets: list[bytes]) -> list[int]:
    offsets, at = [], 0
    for packet in packets:
        offsets.append(at)
        at += len(packet)
    return offsets


OFFSETS: Final = _packet_offsets(PACKETS)


def _flip(rng: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        out[rng.randrange(len(out))] ^= rng.randint(1, 255)
    return bytes(out)


def _truncate(rng: random.Random, data: bytes) -> bytes:
    return data[: rng.randrange(len(data))]


def _duplicate_range(rng: random.Random, data: bytes) -> bytes:
    start = rng.randrange(len(data))
    end = min(len(data), start + rng.randint(1, 400))
    at = rng.randrange(len(data) + 1)
    return data[:at] + data[start:end] * rng.randint(1, 4) + data[at:]


def _insert_random(rng: random.Random, data: bytes) -> bytes:
    at = rng.randrange(len(data) + 1)
    return data[:at] + rng.randbytes(rng.randint(1, 64)) + data[at:]


def _set_length(rng: random.Random, data: bytes) -> bytes:
    # Only meaningful on the unmutated session, whose packet boundaries are known.
    index = rng.randrange(len(PACKETS))
    at = OFFSETS[index]
    (length,) = _LENGTH.unpack_from(SESSION, at)
    new = rng.choice(
        [
            0,
            1,
            length - 1,
            length + 1,
            length + rng.randint(2, 100),
            0xFFFFFFFF,
            0x7FFFFFFF,
            1024 * 1024 + 1,  # the server's max_data_size + 1: the largest accepted frame
            1024 * 1024 + 2,
            rng.randrange(1 << 32),
        ]
    )
    return SESSION[:at] + _LENGTH.pack(new % (1 << 32)) + SESSION[at + 4 :]


def _swap_packets(rng: random.Random, data: bytes) -> bytes:
    packets = list(PACKETS)
    i, j = rng.randrange(len(packets)), rng.randrange(len(packets))
    packets[i], packets[j] = packets[j], packets[i]
    return b"".join(packets)


def _drop_packet(rng: random.Random, data: bytes) -> bytes:
    packets = list(PACKETS)
    del packets[rng.randrange(len(packets))]
    return b"".join(packets)


def _repeat_packet(rng: random.Random, data: bytes) -> bytes:
    packets = list(PACKETS)
    index = rng.randrange(len(packets))
    packets[index:index] = [packets[index]] * rng.randint(1, 5)
    return b"".join(packets)


def _shuffle_packets(rng: random.Random, data: bytes) -> bytes:
    packets = list(PACKETS)
    rng.shuffle(packets)
    return b"".join(packets)


def _garbage(rng: random.Random, data: bytes) -> bytes:
    return rng.randbytes(rng.randint(0, 2000))


def _prefix_then_garbage(rng: random.Random, data: bytes) -> bytes:
    cut = OFFSETS[rng.randrange(len(OFFSETS))]
    return SESSION[:cut] + rng.randbytes(rng.randint(1, 300))


def _packet_garbage(rng: random.Random, data: bytes) -> bytes:
    """A valid prefix, then a well-framed packet of a random command with a random payload."""
    cut = OFFSETS[rng.randrange(len(OFFSETS))]
    command = rng.choice(b"ODCHMRTLNBEUAQKZ\x00")
    payload = rng.randbytes(rng.randint(0, 40))
    return SESSION[:cut] + _LENGTH.pack(len(payload) + 1) + bytes([command]) + payload


Mutator = Callable[[random.Random, bytes], bytes]
#: Mutators that start from the valid session; the byte-level ones may be stacked.
STRUCTURAL: Final[list[Mutator]] = [
    _set_length,
    _swap_packets,
    _drop_packet,
    _repeat_packet,
    _shuffle_packets,
    _prefix_then_garbage,
    _packet_garbage,
]
BYTEWISE: Final[list[Mutator]] = [_flip, _truncate, _duplicate_range, _insert_random]

#: How the client ends its side: half-close and read; close at once; stay silent (the
#: server's idle timeout ends it); or reset (SO_LINGER 0).
ENDINGS: Final = ("eof",) * 14 + ("close",) * 3 + ("silent",) * 2 + ("reset",)


def mutant(seed: int, index: int) -> tuple[str, str, bytes]:
    """The mutant ``index`` of ``seed``: (what was done, how the client ends, the bytes)."""
    rng = random.Random(f"{seed}:{index}")  # noqa: S311 - reproducible, not secret
    kind = rng.random()
    if kind < 0.05:
        name, data = "garbage", _garbage(rng, b"")
    elif kind < 0.40:
        mutator = rng.choice(STRUCTURAL)
        name, data = mutator.__name__, mutator(rng, SESSION)
    else:
        data, names = SESSION, []
        for _ in range(rng.choice((1, 1, 1, 2, 3))):
            mutator = rng.choice(BYTEWISE)
            names.append(mutator.__name__)
            data = mutator(rng, data) if data else data
        name = "+".join(names)
    return name, rng.choice(ENDINGS), data


# --- the server under test -------------------------------------------------------------------


class Counters:
    def __init__(self) -> None:
        self.opened = 0
        self.closed = 0
        self.messages = 0


def fuzz_app(counters: Counters) -> App:
    """An App with handlers on most events, and modifications at end of message."""
    app = App("fuzz")

    @app.on("open")
    def opened(event: Any, ctx: Context) -> None:
        counters.opened += 1

    @app.on("close")
    def closed(event: Any, ctx: Context) -> None:
        counters.closed += 1

    @app.on("connect")
    def on_connect(event: Connect, ctx: Context) -> None:
        ctx.state["connected"] = True

    @app.on("helo")
    def on_helo(event: Helo, ctx: Context) -> None:
        ctx.state["helo"] = event.name

    @app.on("envfrom")
    def on_envfrom(event: EnvFrom, ctx: Context) -> Reject | None:
        return Reject(text="no spammers") if event.address == "spammer@example.org" else None

    @app.on("envrcpt")
    async def on_envrcpt(event: EnvRcpt, ctx: Context) -> None:
        await asyncio.sleep(0)

    @app.on("header")
    def on_header(event: Header, ctx: Context) -> None:
        ctx.state["headers"] = ctx.state.get("headers", 0) + 1

    @app.on("body")
    def on_body(event: Body, ctx: Context) -> None:
        ctx.state["body"] = ctx.state.get("body", 0) + len(event.chunk)

    @app.on("eom")
    async def on_eom(event: EndOfMessage, ctx: Context) -> None:
        await asyncio.sleep(0)
        counters.messages += 1
        ctx.add_header("X-Fuzz", "seen")
        ctx.change_header("Subject", "[fuzz] hello")
        ctx.add_recipient("audit@example.net")

    @app.on("abort")
    def on_abort(event: Abort, ctx: Context) -> None:
        ctx.state["aborts"] = ctx.state.get("aborts", 0) + 1

    return app


EXPECTED_MODIFICATIONS: Final = [
    AddHeader(name="X-Fuzz", value="seen"),
    ChangeHeader(name="Subject", value="[fuzz] hello", index=1),
    AddRecipient(address="audit@example.net"),
]


# --- measurements ----------------------------------------------------------------------------


def _rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def _loop_turns_until(predicate: Callable[[], bool], turns: int = 100_000) -> bool:
    """Let the loop run ready work (no timed sleep) until ``predicate()`` holds."""
    for _ in range(turns):
        if predicate():
            return True
        await asyncio.sleep(0)
    return predicate()


# --- one mutant connection -------------------------------------------------------------------


async def _play(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes, ending: str
) -> None:
    try:
        writer.write(data)
        await writer.drain()
        if ending == "eof":
            writer.write_eof()
        elif ending == "reset":
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            return
        elif ending == "close":
            return
    except ConnectionError:
        pass  # the server found the error early and closed first: fine
    # "eof" and "silent": the server must answer and close, or end it by its idle timeout.
    with contextlib.suppress(ConnectionError):
        while await reader.read(65536):
            pass


async def send_mutant(address: tuple[str, int], index: int) -> str | None:
    """Send mutant ``index``; return a failure description, or None if the server coped."""
    name, ending, data = mutant(SEED, index)
    where = f"seed {SEED} mutant {index} ({name}, {ending}, {len(data)} bytes)"
    try:
        async with asyncio.timeout(MUTANT_TIMEOUT):
            reader, writer = await asyncio.open_connection(*address)
            try:
                await _play(reader, writer, data, ending)
            finally:
                writer.close()
                with contextlib.suppress(ConnectionError):
                    await writer.wait_closed()
    except TimeoutError:
        return f"{where}: the server neither answered nor closed in {MUTANT_TIMEOUT} s"
    return None


async def send_mutants(address: tuple[str, int], indexes: range) -> list[str]:
    """Send mutants over ``CONCURRENCY`` connections at a time; return the failures."""
    queue = list(indexes)
    failures: list[str] = []

    async def worker() -> None:
        while queue:
            failure = await send_mutant(address, queue.pop())
            if failure is not None:
                failures.append(failure)

    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return failures


async def normal_message(server: MilterServer, label: str) -> None:
    """A plain session still gets Continue and the end-of-message modifications."""
    async with await connect(server) as client:
        await start_session(client)
        answer = await send_message(client)
        assert answer.verdict == Continue(), f"{label}: {answer}"
        assert answer.modifications == EXPECTED_MODIFICATIONS, f"{label}: {answer}"


# --- the tests -------------------------------------------------------------------------------


def test_unmutated_session_is_served_whole() -> None:
    """The session the mutants start from is valid: served to the end, quit included."""
    counters = Counters()
    app = fuzz_app(counters)

    async def main() -> bytes:
        server = MilterServer(app, spec="inet:0@[127.0.0.1]", timeout=SERVER_IDLE_TIMEOUT)
        await server.start()
        try:
            reader, writer = await asyncio.open_connection(*server.address)
            writer.write(SESSION)
            writer.write_eof()
            data = await reader.read()
            writer.close()
            await writer.wait_closed()
            return data
        finally:
            server.request_stop()
            await server.close()

    with structlog.testing.capture_logs() as logs:
        answer = run(main())
    assert counters.messages == 1
    assert counters.opened == counters.closed == 2  # QUIT_NC starts a second session
    assert not [entry for entry in logs if entry["log_level"] in ("warning", "error")], logs
    assert answer  # negotiation reply, verdicts, modifications


def test_mutants_are_deterministic() -> None:
    assert mutant(SEED, 7) == mutant(SEED, 7)
    assert len({mutant(SEED, index)[2] for index in range(200)}) > 150


def test_server_survives_thousands_of_mutated_sessions() -> None:
    counters = Counters()
    app = fuzz_app(counters)

    async def main() -> dict[str, float]:
        server = MilterServer(app, spec="inet:0@[127.0.0.1]", timeout=SERVER_IDLE_TIMEOUT)
        await server.start()
        try:
            address = server.address
            await normal_message(server, "before any mutant")
            gc.collect()
            tasks_before = asyncio.all_tasks()
            fds_before = _fds()
            rss_before = _rss()
            started = time.perf_counter()
            failures: list[str] = []
            for first in range(0, MUTANTS, CHUNK):
                failures += await send_mutants(address, range(first, first + CHUNK))
                await normal_message(server, f"seed {SEED} after mutants {first}-{first + CHUNK}")
            elapsed = time.perf_counter() - started
            assert not failures, "\n".join(failures)

            drained = await _loop_turns_until(lambda: not server._connections)
            assert drained, f"{len(server._connections)} connections left (seed {SEED})"
            assert await _loop_turns_until(lambda: asyncio.all_tasks() <= tasks_before), (
                f"tasks leaked: {asyncio.all_tasks() - tasks_before}"
            )
            gc.collect()
            fds_after = _fds()
            rss_after = _rss()
            assert fds_after <= fds_before + FD_MARGIN, (fds_before, fds_after)
            assert rss_after - rss_before < RSS_MARGIN, (rss_before, rss_after)
            return {
                "seconds": elapsed,
                "mutants_per_second": MUTANTS / elapsed,
                "rss_growth_mib": (rss_after - rss_before) / 2**20,
                "fds": fds_after - fds_before,
            }
        finally:
            server.request_stop()
            await server.close()

    with structlog.testing.capture_logs() as logs:
        figures = run(main(), timeout=FUZZ_TIMEOUT)
    counts = Counter(str(entry["event"]) for entry in logs)
    print(f"\nserver fuzz, seed {SEED}: {figures}, log events {dict(counts)}")
    # Every session that opened was closed once; no connection ended in a crash of ours.
    assert counters.opened == counters.closed
    crashes = [entry for entry in logs if entry["event"] == "connection_failed"]
    assert not crashes, crashes[:5]
    events = {entry["event"] for entry in logs}
    assert "protocol_error" in events  # the mutants did reach the decoder
    assert "idle_timeout" in events  # and silent ones ended by the server's timer
