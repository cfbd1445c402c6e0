"""Record through the proxy, load the file, replay it against an App.

A real milter (MilterServer over loopback or a unix socket) sits behind :func:`record`; the
MTA is :class:`MtaClient`. Nothing sleeps to synchronise: the tests wait for the milter's
answers, for ``ready`` and for the recorder task to end.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import signal
import tempfile
from collections.abc import AsyncIterator, Iterable, Iterator
from pathlib import Path
from typing import Any, Final

import pytest

from milterapp.app import App
from milterapp.context import Context
from milterapp.events import Abort, Connect, EndOfMessage, EnvFrom, Event, Negotiate, Quit
from milterapp.protocol.codec import encode_command, encode_response
from milterapp.protocol.mta import DEFAULT_OFFER, Answer, MtaConnection
from milterapp.replies import Continue, Reject, Reply
from milterapp.testing import MtaClient
from milterapp.testing.recording import (
    RecordedConnection,
    RecordedPacket,
    Recording,
    RecordingError,
    ReplayReport,
    load_recording,
    record,
    record_sync,
    replay,
    replay_sync,
)
from tests.server.support import (
    CLIENT,
    HELO,
    LOOPBACK,
    message_events,
    run,
    running_server,
    target,
)

TIMEOUT: Final = 20.0
SPAMMER: Final = "spam@example.com"
SENDERS: Final = ("alice@example.org", SPAMMER, "carol@example.org")

Exchange = tuple[Event, Answer | None]


def make_app(value: str = "checked", *, progress: int = 0) -> App:
    """Rejects SPAMMER at MAIL, adds a header at end of message; keeps the message, so
    RCPT, headers and body come without replies (NR_RCPT, NR_HDR, NR_BODY)."""
    app = App("recorded", keep_message=True)

    @app.on("connect")
    def connect(event: Connect) -> None:
        return None

    @app.on("envfrom")
    def envfrom(event: EnvFrom) -> Reject | None:
        if event.address == SPAMMER:
            return Reject(code=550, xcode="5.7.1", text="no mail from you")
        return None

    @app.on("eom")
    async def eom(event: EndOfMessage, ctx: Context) -> None:
        for _ in range(progress):
            await ctx.progress()
        ctx.add_header("X-Recorded", f"{value} for {ctx.message.sender.address}")

    return app


class TappedMta(MtaConnection):
    """An MTA state machine that keeps every byte sent and received."""

    def __init__(self) -> None:
        super().__init__()
        self.sent = bytearray()
        self.received = bytearray()

    def send(self, event: Event, *, force: bool = False) -> bytes:
        data = super().send(event, force=force)
        self.sent += data
        return data

    def receive_data(self, data: bytes) -> None:
        self.received += data
        super().receive_data(data)


# --- driving an MTA connection -----------------------------------------------------------


async def connect(address: Any) -> MtaClient:
    where = address if isinstance(address, tuple) else f"unix:{address}"
    client = await MtaClient.connect(where, timeout=5.0)
    client.mta = TappedMta()
    return client


async def opening(client: MtaClient) -> list[Exchange]:
    exchanges: list[Exchange] = [(DEFAULT_OFFER, await client.send(DEFAULT_OFFER))]
    for event in (CLIENT, HELO):
        if not client.mta.suppressed(event):
            exchanges.append((event, await client.send(event)))
    return exchanges


async def message(client: MtaClient, sender: str) -> list[Exchange]:
    """One message as Postfix sends it, up to its verdict, then the abort Postfix sends."""
    exchanges: list[Exchange] = []
    for event in (*message_events(sender=sender), EndOfMessage()):
        if client.mta.suppressed(event):
            continue
        answer = await client.send(event)
        exchanges.append((event, answer))
        if answer is not None and not isinstance(answer.verdict, Continue):
            break
    exchanges.append((Abort(), await client.send(Abort())))
    return exchanges


async def messages(client: MtaClient, senders: Iterable[str]) -> list[Exchange]:
    return [exchange for sender in senders for exchange in await message(client, sender)]


async def finish(client: MtaClient) -> list[Exchange]:
    exchanges: list[Exchange] = [(Quit(), await client.send(Quit()))]
    await client.close(quit=False)
    return exchanges


async def two_connections(address: Any) -> list[tuple[TappedMta, list[Exchange]]]:
    """Connection 1 sends a message, connection 2 runs whole meanwhile, then 1 goes on."""
    first = await connect(address)
    first_exchanges = await opening(first) + await message(first, SENDERS[0])
    second = await connect(address)
    second_exchanges = await opening(second) + await messages(second, SENDERS)
    second_exchanges += await finish(second)
    first_exchanges += await messages(first, SENDERS[1:]) + await finish(first)
    assert isinstance(first.mta, TappedMta)
    assert isinstance(second.mta, TappedMta)
    return [(first.mta, first_exchanges), (second.mta, second_exchanges)]


def answers(exchanges: list[Exchange]) -> list[Answer | None]:
    return [answer for _, answer in exchanges]


def expected_letters(mta: MtaConnection, exchanges: list[Exchange]) -> list[tuple[str, str]]:
    """(direction, command) of every packet of a conversation, in wire order."""
    letters = []
    for event, answer in exchanges:
        letters.append(("mta", encode_command(event)[4:5].decode()))
        if answer is None:
            continue
        replies: list[Reply] = [*answer.modifications]
        if isinstance(event, Negotiate):
            assert mta.reply is not None
            replies.append(mta.reply)
        else:
            assert answer.verdict is not None
            replies.append(answer.verdict)
        letters.extend(("milter", encode_response(reply)[4:5].decode()) for reply in replies)
    return letters


# --- running the recorder ----------------------------------------------------------------


def spec_of(address: Any) -> str:
    if isinstance(address, tuple):
        return f"inet:{address[1]}@[{address[0]}]"
    return f"unix:{address}"


@contextlib.asynccontextmanager
async def recorder(upstream: str, out: Path, listen: str = LOOPBACK) -> AsyncIterator[Any]:
    """Run :func:`record` in a task; yield the address it listens on; stop it on exit."""
    ready: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    stop = asyncio.Event()
    task = asyncio.create_task(record(listen, upstream, out, ready=ready.set_result, stop=stop))
    await asyncio.wait({task, ready}, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        task.result()  # record() failed before it listened: raise its error
    try:
        yield ready.result()
    finally:
        stop.set()
        await task


async def recorded_session(out: Path, app: App) -> list[tuple[TappedMta, list[Exchange]]]:
    """Record two connections to ``app``'s milter into ``out``."""
    async with running_server(app) as server, recorder(spec_of(server.address), out) as proxy:
        return await two_connections(proxy)


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A fresh short directory for unix sockets (sun_path holds 107 bytes; tmp_path may not)."""
    path = Path(tempfile.mkdtemp(prefix="mt-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


# --- recording ---------------------------------------------------------------------------


def test_record_client_sees_same_answers_as_without_proxy(tmp_path: Path) -> None:
    async def scenario() -> tuple[list[Any], list[Any]]:
        async with running_server(make_app()) as server:
            direct = await two_connections(target(server))
            async with recorder(spec_of(server.address), tmp_path / "r.jsonl") as proxy:
                return direct, await two_connections(proxy)

    direct, proxied = run(scenario())
    for (_, without), (_, through) in zip(direct, proxied, strict=True):
        assert answers(through) == answers(without)
    verdicts = [answer.verdict for answer in answers(proxied[0][1]) if answer is not None]
    assert Reject(code=550, xcode="5.7.1", text="no mail from you") in verdicts


def test_record_writes_every_packet_in_order_with_exact_bytes(tmp_path: Path) -> None:
    out = tmp_path / "r.jsonl"
    sessions = run(recorded_session(out, make_app()))
    recording = load_recording(out)
    assert [c.conn for c in recording.connections] == [1, 2]
    for connection, (mta, exchanges) in zip(recording.connections, sessions, strict=True):
        assert connection.closed
        assert connection.error is None
        packets = connection.packets
        assert [(p.dir, p.cmd) for p in packets] == expected_letters(mta, exchanges)
        assert b"".join(p.frame() for p in packets if p.dir == "mta") == mta.sent
        assert b"".join(p.frame() for p in packets if p.dir == "milter") == mta.received
        times = [p.t for p in packets]
        assert times == sorted(times)
        assert all(t >= 0 and round(t, 3) == t for t in times)
    # The NR commands (RCPT, headers, body) are in the file although nothing answered them.
    assert {"R", "L", "B"} <= {p.cmd for p in recording.connections[0].packets}


def test_record_relays_and_records_packets_above_64k(tmp_path: Path) -> None:
    out = tmp_path / "r.jsonl"
    big = "x" * 200_000  # Postfix sends each header whole, however long

    async def scenario() -> Answer | None:
        async with (
            running_server(make_app()) as server,
            recorder(spec_of(server.address), out) as proxy,
        ):
            client = await connect(proxy)
            await opening(client)
            for event in message_events(headers=[("X-Big", big)]):
                if not client.mta.suppressed(event):
                    await client.send(event)
            answer = await client.send(EndOfMessage())
            await finish(client)
        return answer

    answer = run(scenario())
    assert answer is not None
    assert answer.verdict == Continue()
    (connection,) = load_recording(out).connections
    (header,) = [p for p in connection.packets if p.cmd == "L"]
    assert header.payload == b"X-Big\x00" + big.encode() + b"\x00"


def test_record_file_is_json_lines_with_header_and_markers(tmp_path: Path) -> None:
    out = tmp_path / "r.jsonl"

    async def scenario() -> str:
        async with running_server(make_app()) as server:
            upstream = spec_of(server.address)
            async with recorder(upstream, out) as proxy:
                await two_connections(proxy)
        return upstream

    upstream = run(scenario())
    lines = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    header, records = lines[0], lines[1:]
    assert header["format"] == "milterapp-recording"
    assert header["version"] == 1
    assert header["upstream"] == upstream
    assert "T" in header["recorded_at"]
    for conn in (1, 2):
        own = [line for line in records if line["conn"] == conn]
        assert own[0] == {"conn": conn, "event": "open"}
        assert own[-1]["event"] == "close"
        assert set(own[-1]) == {"conn", "event", "t"}
        assert all(set(line) == {"conn", "dir", "t", "cmd", "payload"} for line in own[1:-1])
    # Connection 2 ran while connection 1 was open: connection 1 has lines before and after.
    conns = [line["conn"] for line in records]
    assert conns.index(1) < conns.index(2) < len(conns) - 1 - conns[::-1].index(1)


def test_record_listens_and_connects_on_unix_sockets(sock_dir: Path) -> None:
    out = sock_dir / "r.jsonl"
    milter = f"unix:{sock_dir}/milter.sock"

    async def scenario() -> tuple[TappedMta, list[Exchange], bool]:
        async with (
            running_server(make_app(), milter),
            recorder(milter, out, listen=f"unix:{sock_dir}/proxy.sock") as proxy,
        ):
            assert proxy == str(sock_dir / "proxy.sock")
            client = await connect(proxy)
            exchanges = await opening(client) + await message(client, SENDERS[0])
            exchanges += await finish(client)
        assert isinstance(client.mta, TappedMta)
        return client.mta, exchanges, (await replay(out, make_app())).ok

    mta, exchanges, replayed_ok = run(scenario())
    assert not (sock_dir / "proxy.sock").exists()
    recording = load_recording(out)
    assert recording.upstream == milter
    (connection,) = recording.connections
    assert [(p.dir, p.cmd) for p in connection.packets] == expected_letters(mta, exchanges)
    assert replayed_ok


def test_record_stop_closes_open_connections_with_their_markers(tmp_path: Path) -> None:
    out = tmp_path / "r.jsonl"

    async def scenario() -> bool:
        async with running_server(make_app()) as server:
            async with recorder(spec_of(server.address), out) as proxy:
                client = await connect(proxy)
                await opening(client)
            # The recorder has stopped; the MTA connection it relayed is closed.
            closed = await client.closed_by_milter()
            await client.close(quit=False)
        return closed

    assert run(scenario())
    (connection,) = load_recording(out).connections
    assert connection.closed
    assert connection.error is None
    assert [p.cmd for p in connection.packets] == ["O", "O", "C", "c"]


def test_record_relays_malformed_milter_bytes_and_stops_recording(tmp_path: Path) -> None:
    garbage = b"\x00\x00\x00\x00 is no milter packet"
    offer = encode_command(DEFAULT_OFFER)

    async def bad_milter(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(len(offer))
        writer.write(garbage)
        await writer.drain()
        writer.close()

    async def scenario() -> bytes:
        milter = await asyncio.start_server(bad_milter, "127.0.0.1", 0)
        async with milter, recorder(spec_of(milter.sockets[0].getsockname()), out) as proxy:
            reader, writer = await asyncio.open_connection(*proxy)
            writer.write(offer)
            relayed = await reader.read()  # until the proxy closes
            writer.close()
        return relayed

    out = tmp_path / "r.jsonl"
    assert run(scenario()) == garbage
    (connection,) = load_recording(out).connections
    assert [(p.dir, p.cmd, p.payload) for p in connection.packets] == [("mta", "O", offer[5:])]
    assert connection.closed
    assert connection.error is not None
    assert connection.error.startswith("milter stream: packet length 0")


def test_record_closes_mta_connection_when_milter_is_unreachable(sock_dir: Path) -> None:
    out = sock_dir / "r.jsonl"

    async def scenario() -> bytes:
        async with recorder(f"unix:{sock_dir}/nobody.sock", out) as proxy:
            reader, writer = await asyncio.open_connection(*proxy)
            # Nothing written: unread data would turn the close into a reset.
            data = await reader.read()
            writer.close()
        return data

    assert run(scenario()) == b""
    (connection,) = load_recording(out).connections
    assert connection.packets == []
    assert connection.closed
    assert connection.error is not None
    assert "cannot connect to the milter at unix:" in connection.error


def test_record_sync_stops_on_sigterm_and_restores_the_handler(tmp_path: Path) -> None:
    def unexpected(signum: int, frame: Any) -> None:
        raise AssertionError("record_sync did not handle SIGTERM")

    def ready(address: Any) -> None:
        loop = asyncio.get_running_loop()
        # The bound (no asyncio.timeout can wrap asyncio.run): a stop that never comes
        # stops the loop, and record_sync fails.
        loop.call_later(TIMEOUT, loop.stop)
        signal.raise_signal(signal.SIGTERM)

    out = tmp_path / "r.jsonl"
    previous = signal.signal(signal.SIGTERM, unexpected)
    try:
        record_sync(LOOPBACK, "inet:9@[127.0.0.1]", out, ready=ready)
        assert signal.getsignal(signal.SIGTERM) is unexpected
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert load_recording(out).connections == []


# --- loading -----------------------------------------------------------------------------


def test_load_recording_names_the_line_cut_short(tmp_path: Path) -> None:
    out = tmp_path / "r.jsonl"
    run(recorded_session(out, make_app()))
    lines = out.read_text(encoding="utf-8").splitlines(keepends=True)
    out.write_text("".join(lines[:7]) + lines[7][:25], encoding="utf-8")
    with pytest.raises(RecordingError, match=r"r\.jsonl, line 8: not valid JSON.*cut short"):
        load_recording(out)


_HEADER: Final = (
    '{"format": "milterapp-recording", "version": 1, "recorded_at": "2024-01-01T00:00:00Z", '
    '"upstream": "inet:10025@[127.0.0.1]"}\n'
)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "the file is empty"),
        ('{"format": "pcap"}\n', "line 1: not a milterapp-recording header"),
        (
            '{"format": "milterapp-recording", "version": 9}\n',
            "line 1: recording version 9 is not supported",
        ),
        ("[1, 2]\n", "line 1: expected a JSON object"),
        (
            _HEADER + '{"conn": 1, "dir": "mta", "t": 0, "cmd": "O", "payload": "@"}\n',
            "line 2: payload: Value error, the payload is not valid base64",
        ),
        (
            _HEADER + '\n{"conn": 1, "dir": "up", "t": 0, "cmd": "O", "payload": ""}\n',
            "line 3: dir: Input should be 'mta' or 'milter'",
        ),
        (_HEADER + '{"conn": 1, "event": "opened"}\n', "line 2: event: Input should be"),
    ],
)
def test_load_recording_rejects_invalid_files(tmp_path: Path, text: str, problem: str) -> None:
    out = tmp_path / "r.jsonl"
    out.write_text(text, encoding="utf-8")
    with pytest.raises(RecordingError, match=problem):
        load_recording(out)


# --- replaying ---------------------------------------------------------------------------


def test_replay_same_app_matches_every_answer(tmp_path: Path) -> None:
    out = tmp_path / "r.jsonl"

    async def scenario() -> tuple[list[Any], ReplayReport, ReplayReport]:
        sessions = await recorded_session(out, make_app())
        checked = await replay(out, make_app())
        unchecked = await replay(load_recording(out), make_app(), mta_side_check=False)
        return sessions, checked, unchecked

    sessions, report, unchecked = run(scenario())
    report.assert_same()
    assert unchecked.ok
    answered = sum(answer is not None for _, exchanges in sessions for answer in answers(exchanges))
    assert len(report.answers) == answered
    assert report.mismatches == []
    assert report.format() == f"all {answered} answers match the recording"


def test_replay_changed_header_names_command_and_both_answers(tmp_path: Path) -> None:
    out = tmp_path / "r.jsonl"

    async def scenario() -> ReplayReport:
        await recorded_session(out, make_app())
        return await replay(out, make_app("changed"))

    report = run(scenario())
    assert not report.ok
    # Alice's and Carol's messages on both connections; the rejected one matches.
    assert [(m.conn, m.command and m.command.cmd) for m in report.mismatches] == [
        (1, "E"),
        (1, "E"),
        (2, "E"),
        (2, "E"),
    ]
    with pytest.raises(AssertionError) as caught:
        report.assert_same()
    text = str(caught.value)
    assert text.startswith(f"4 of {len(report.answers)} answers differ from the recording:")
    assert "'E' (line " in text
    assert "): EndOfMessage()\n" in text  # the command as the repr shows it: no empty chunk
    recorded = "AddHeader(name='X-Recorded', value='checked for alice@example.org'), Continue()"
    replayed = "AddHeader(name='X-Recorded', value='changed for alice@example.org'), Continue()"
    assert f"recorded: {recorded}\n  replayed: {replayed}" in text


def test_replay_ignores_progress_on_both_sides(tmp_path: Path) -> None:
    out = tmp_path / "r.jsonl"

    async def scenario() -> list[ReplayReport]:
        await recorded_session(out, make_app(progress=1))
        return [await replay(out, make_app(progress=n)) for n in (0, 2)]

    reports = run(scenario())
    assert "p" in {p.cmd for c in load_recording(out).connections for p in c.packets}
    for report in reports:
        report.assert_same()


def test_replay_app_negotiating_differently_reports_it(tmp_path: Path) -> None:
    out = tmp_path / "r.jsonl"

    async def scenario() -> ReplayReport:
        await recorded_session(out, make_app())
        return await replay(out, App("other"))  # no handlers: no events, no NR flags

    first = run(scenario()).mismatches[0]
    assert (first.conn, first.number, first.command and first.command.cmd) == (1, 1, "O")
    assert first.recorded is not None
    assert first.replayed is not None
    assert first.recorded[0].payload != first.replayed[0].payload


def test_replay_of_killed_recorder_judges_what_was_recorded(tmp_path: Path) -> None:
    out = tmp_path / "r.jsonl"

    async def scenario() -> tuple[Recording, ReplayReport]:
        await recorded_session(out, make_app())
        lines = out.read_text(encoding="utf-8").splitlines(keepends=True)
        # Killed right after connection 1's first MAIL reached the milter.
        mail = next(i for i, line in enumerate(lines) if '"cmd": "M"' in line)
        out.write_text("".join(lines[: mail + 1]), encoding="utf-8")
        recording = load_recording(out)
        return recording, await replay(recording, make_app())

    recording, report = run(scenario())
    (connection,) = recording.connections
    assert not connection.closed
    assert report.ok
    assert [a.command and a.command.cmd for a in report.answers] == ["O", "C"]


def test_replay_sync_replays_a_recording_built_in_memory() -> None:
    offer = encode_command(DEFAULT_OFFER)
    packets = [
        RecordedPacket(dir="mta", cmd="O", payload=offer[5:]),
        RecordedPacket(dir="mta", cmd="Q"),
    ]
    recording = Recording(connections=[RecordedConnection(conn=7, closed=True, packets=packets)])
    report = replay_sync(recording, App("empty"), timeout=5.0)
    # The recording has no answer to O: the App's is reported against nothing.
    (answer,) = report.answers
    assert (answer.conn, answer.number, answer.recorded) == (7, 1, None)
    assert answer.replayed is not None
    assert answer.replayed[0].cmd == "O"
    assert not report.ok
