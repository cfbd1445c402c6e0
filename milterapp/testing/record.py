"""Record a milter conversation through a proxy; replay it against an App and compare.

:func:`record` sits between an MTA and a running milter: it relays every byte unchanged and
writes each packet, both directions, to a JSON Lines file. :func:`replay` feeds a recording's
MTA packets to an App, through the server's own connection handler over an in-memory pipe,
and compares the App's answers with the recorded ones: a session of a real Postfix or
Sendmail becomes a regression test.

A recording is one JSON object per line (``t``: seconds since the connection opened;
``payload``: base64)::

    {"format": "milterapp-recording", "version": 1, "recorded_at": "...", "upstream": "..."}
    {"conn": 1, "event": "open"}
    {"conn": 1, "dir": "mta", "t": 0.0, "cmd": "O", "payload": "AAAABgAAAf8AH///"}
    {"conn": 1, "dir": "milter", "t": 0.002, "cmd": "O", "payload": "AAAABgAAAP8AD6PC"}
    {"conn": 1, "event": "close", "t": 0.513}

A close marker has an ``"error"`` when the connection could not be recorded in full: the
milter was unreachable, or a stream was not made of milter packets (it is still relayed).
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import signal
import struct
from collections import deque
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Final, Literal, TypeAlias

import structlog
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from milterapp.app import App
from milterapp.errors import MilterError, ProtocolError, RemoteProtocolError
from milterapp.listener import open_listener
from milterapp.protocol.codec import decode_command, decode_response
from milterapp.protocol.constants import MAX_DATA_SIZE_1M, ActionFlag, ProtocolFlag
from milterapp.protocol.framing import FrameDecoder, encode_frame
from milterapp.protocol.mta import MtaConnection
from milterapp.protocol.negotiation import SessionOptions
from milterapp.session import ConnectionHandler
from milterapp.spec import ConnectionSpec

__all__ = [
    "RECORDING_FORMAT",
    "RECORDING_VERSION",
    "ComparedAnswer",
    "RecordedConnection",
    "RecordedPacket",
    "Recording",
    "RecordingError",
    "ReplayReport",
    "load_recording",
    "record",
    "record_sync",
    "replay",
    "replay_sync",
]

RECORDING_FORMAT: Final = "milterapp-recording"
RECORDING_VERSION: Final = 1
Direction: TypeAlias = Literal["mta", "milter"]

# Postfix reads milter packets up to INT_MAX/2 and sends headers uncapped: frame both ways
# with a limit no real packet reaches, so that only a broken stream stops the recording.
_MAX_PACKET: Final = 1 << 30
_READ_SIZE: Final = 256 * 1024
_CONNECT_TIMEOUT: Final = 30.0  # Postfix's milter_connect_timeout
_CLOSE_TIMEOUT: Final = 5.0
_MODIFICATIONS: Final = frozenset("him+2-ebq")  # sent before an end-of-message verdict
_NEVER_REPLY: Final = frozenset("DAQK")
_OPTIONS: Final = struct.Struct("!III")
_LOG: Final = structlog.get_logger("milterapp")


class RecordingError(MilterError, ValueError):
    """A file is not a valid recording; the message names the file and the line."""


# --- the recording -----------------------------------------------------------------------


class RecordedPacket(BaseModel):
    """One packet as it crossed the wire: direction, time, command letter, payload."""

    model_config = ConfigDict(frozen=True)

    dir: Direction
    t: float = 0.0
    cmd: str = Field(min_length=1, max_length=1)
    payload: bytes = b""
    line: int | None = None  # where it is in the recording file, if it came from one

    @field_validator("cmd")
    @classmethod
    def _one_byte(cls, cmd: str) -> str:
        if ord(cmd) > 0xFF:
            raise ValueError("a command letter is one byte (U+0000 to U+00FF)")
        return cmd

    def frame(self) -> bytes:
        """The packet's bytes: length prefix, command byte, payload."""
        return encode_frame(self.cmd.encode("latin-1"), self.payload)

    def describe(self) -> str:
        """The decoded command or reply (``EnvFrom(...)``), or the raw bytes if malformed."""
        code = ord(self.cmd)
        try:
            if self.dir == "mta":
                text = repr(decode_command(code, self.payload))
            else:
                text = repr(decode_response(code, self.payload))
        except ProtocolError:
            text = f"{self.cmd!r} {self.payload!r}"
        # Long enough for a whole negotiation reply; a body chunk is cut.
        return text if len(text) <= 1000 else text[:997] + "..."


class RecordedConnection(BaseModel):
    """One MTA connection: its packets, both directions, in the order they were read.

    ``closed`` is False when the recorder was killed before the connection ended; ``error``
    says why the connection was not recorded in full.
    """

    conn: int
    packets: list[RecordedPacket] = Field(default_factory=list)
    closed: bool = False
    error: str | None = None


class Recording(BaseModel):
    """A whole recording: where and when it was made, and its connections in order."""

    recorded_at: datetime | None = None
    upstream: str = ""
    connections: list[RecordedConnection] = Field(default_factory=list)


class _Marker(BaseModel):
    conn: int
    event: Literal["open", "close"]
    t: float | None = None
    error: str | None = None


class _PacketLine(BaseModel):
    conn: int
    dir: Direction
    t: float
    cmd: str
    payload: bytes

    @field_validator("payload", mode="before")
    @classmethod
    def _base64(cls, value: Any) -> Any:
        if not isinstance(value, str):
            raise ValueError("the payload must be a base64 string")
        try:
            return base64.b64decode(value, validate=True)
        except ValueError:
            raise ValueError("the payload is not valid base64") from None


def load_recording(path: str | Path) -> Recording:
    """Read a recording file.

    Raises:
        RecordingError: the file is empty, is no milterapp recording, or has a line that is
            not a valid record (a line cut short by a killed recorder included).
    """
    with Path(path).open(encoding="utf-8") as lines:
        return _parse(lines, str(path))


def _parse(lines: Iterable[str], name: str) -> Recording:
    header: Recording | None = None
    connections: dict[int, RecordedConnection] = {}
    for number, text in enumerate(lines, 1):
        where = f"{name}, line {number}"
        if not text.strip():
            continue
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            cut = "" if text.endswith("\n") else " (the line is cut short)"
            raise RecordingError(f"{where}: not valid JSON: {exc.msg}{cut}") from None
        if not isinstance(data, dict):
            raise RecordingError(f"{where}: expected a JSON object")
        try:
            if header is None:
                header = _header(data, where)
            elif "event" in data:
                marker = _Marker.model_validate(data)
                connection = connections.setdefault(
                    marker.conn, RecordedConnection(conn=marker.conn)
                )
                connection.closed = connection.closed or marker.event == "close"
                connection.error = marker.error or connection.error
            else:
                line = _PacketLine.model_validate(data)
                connection = connections.setdefault(line.conn, RecordedConnection(conn=line.conn))
                fields = line.model_dump(exclude={"conn"})
                connection.packets.append(RecordedPacket(**fields, line=number))
        except ValidationError as exc:
            error = exc.errors()[0]
            field = ".".join(str(part) for part in error["loc"])
            raise RecordingError(f"{where}: {field}: {error['msg']}") from None
    if header is None:
        raise RecordingError(f"{name}: the file is empty; a recording starts with its header")
    header.connections = list(connections.values())
    return header


def _header(data: dict[str, Any], where: str) -> Recording:
    if data.get("format") != RECORDING_FORMAT:
        raise RecordingError(f"{where}: not a {RECORDING_FORMAT} header; is this a recording?")
    if data.get("version") != RECORDING_VERSION:
        raise RecordingError(
            f"{where}: recording version {data.get('version')!r} is not supported "
            f"(this milterapp reads version {RECORDING_VERSION})"
        )
    return Recording.model_validate({key: data.get(key) for key in ("recorded_at", "upstream")})


# --- recording ---------------------------------------------------------------------------


class _RecordingFile:
    """The recording being written: header first, then one line per packet or marker."""

    def __init__(self, path: str | Path, upstream: ConnectionSpec) -> None:
        self._file: IO[str] = Path(path).open("w", encoding="utf-8")  # noqa: SIM115
        recorded_at = datetime.now(UTC).isoformat(timespec="seconds")
        self.write(
            {
                "format": RECORDING_FORMAT,
                "version": RECORDING_VERSION,
                "recorded_at": recorded_at,
                "upstream": str(upstream),
            }
        )

    def write(self, line: dict[str, Any]) -> None:
        # One write and one flush with no await in between: lines of concurrent connections
        # never interleave, and a killed recorder leaves everything up to the last line.
        self._file.write(json.dumps(line) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class _Connection:
    """One proxied connection's recording state."""

    def __init__(self, conn: int, out: _RecordingFile) -> None:
        self.conn = conn
        self.out = out
        self.start = asyncio.get_running_loop().time()
        self.error: str | None = None
        self.log: Any = _LOG.bind(conn=conn)

    def elapsed(self) -> float:
        return round(asyncio.get_running_loop().time() - self.start, 3)

    def marker(self, event: str) -> None:
        line: dict[str, Any] = {"conn": self.conn, "event": event}
        if event == "close":
            line["t"] = self.elapsed()
            if self.error is not None:
                line["error"] = self.error
        self.out.write(line)

    def take(self, direction: Direction, frames: FrameDecoder, data: bytes) -> None:
        """Write the packets ``data`` completes; on a framing error, stop recording."""
        frames.feed(data)
        try:
            while (frame := frames.next_frame()) is not None:
                command, payload = frame
                self.out.write(
                    {
                        "conn": self.conn,
                        "dir": direction,
                        "t": self.elapsed(),
                        "cmd": chr(command),
                        "payload": base64.b64encode(payload).decode("ascii"),
                    }
                )
        except RemoteProtocolError as exc:
            self.fail(direction, str(exc))

    def fail(self, direction: Direction, why: str) -> None:
        self.error = f"{direction} stream: {why}; relayed but not recorded from there on"
        self.log.warning("recording_stopped", direction=direction, error=why)


async def _open_connection(
    spec: ConnectionSpec,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    async with asyncio.timeout(_CONNECT_TIMEOUT):
        if spec.scheme == "unix":
            assert spec.path is not None
            return await asyncio.open_unix_connection(spec.path, limit=_READ_SIZE)
        return await asyncio.open_connection(spec.connect_host, spec.port, limit=_READ_SIZE)


async def _close(writer: asyncio.StreamWriter) -> None:
    """Close after what was written is sent; abort if the peer does not take it in time."""
    writer.close()
    try:
        async with asyncio.timeout(_CLOSE_TIMEOUT):
            await writer.wait_closed()
    except TimeoutError:
        writer.transport.abort()
    except OSError:
        pass  # the peer reset the connection: closed all the same


class _Recorder:
    """The proxy: relays each MTA connection to the milter and records its packets."""

    def __init__(self, upstream: ConnectionSpec, out: _RecordingFile) -> None:
        self.upstream = upstream
        self.out = out
        self._ids = itertools.count(1)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closing = False

    async def serve(
        self, mta_reader: asyncio.StreamReader, mta_writer: asyncio.StreamWriter
    ) -> None:
        if self._closing:  # accepted just before the listener closed
            mta_writer.transport.abort()
            return
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        conn = _Connection(next(self._ids), self.out)
        conn.marker("open")
        try:
            await self._relay(conn, mta_reader, mta_writer)
        except asyncio.CancelledError:
            # The recorder stops: a normal end here (asyncio reports a cancelled
            # start_server callback task as an error).
            pass
        finally:
            await _close(mta_writer)
            conn.marker("close")
            self._tasks.discard(task)

    async def _relay(
        self, conn: _Connection, mta_reader: asyncio.StreamReader, mta_writer: asyncio.StreamWriter
    ) -> None:
        try:
            milter_reader, milter_writer = await _open_connection(self.upstream)
        except OSError as exc:
            conn.error = f"cannot connect to the milter at {self.upstream}: {exc!r}"
            conn.log.warning("upstream_unreachable", upstream=str(self.upstream), error=repr(exc))
            return
        pumps = [
            asyncio.create_task(_pump(conn, "mta", mta_reader, milter_writer)),
            asyncio.create_task(_pump(conn, "milter", milter_reader, mta_writer)),
        ]
        try:
            # When either side closes (or fails), the other is closed too.
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pump in pumps:
                pump.cancel()
            milter_writer.close()  # now: a second cancel below must not leave it open
            results = await asyncio.gather(*pumps, return_exceptions=True)
            await _close(milter_writer)
        for result in results:
            if isinstance(result, Exception) and not isinstance(result, OSError):
                conn.log.error("relay_failed", exc_info=result)

    async def close(self) -> None:
        """End every connection (each gets its close marker), then close the file."""
        self._closing = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.out.close()


async def _pump(
    conn: _Connection,
    direction: Direction,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
) -> None:
    """Relay one direction byte for byte, recording the packets on the way."""
    frames = FrameDecoder(_MAX_PACKET)
    while data := await reader.read(_READ_SIZE):
        if conn.error is None:
            # Recorded before it is relayed: no answer can be read, and recorded, before the
            # packet it answers is in the file.
            conn.take(direction, frames, data)
        writer.write(data)
        await writer.drain()
    if conn.error is None and frames.buffered:
        conn.fail(direction, f"closed in the middle of a packet ({frames.buffered} bytes)")


def _as_spec(spec: str | ConnectionSpec) -> ConnectionSpec:
    return ConnectionSpec.parse(spec) if isinstance(spec, str) else spec


async def record(
    listen: str | ConnectionSpec,
    upstream: str | ConnectionSpec,
    out: str | Path,
    *,
    ready: Callable[[Any], None] | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Relay MTA connections on ``listen`` to the milter at ``upstream``, recording to ``out``.

    Bytes go through unchanged and in order. Each MTA connection gets its own connection to
    the milter; when either side closes, the other is closed. Runs until ``stop`` is set
    (forever without one), then closes the listener and every connection.

    Args:
        ready: called once listening, with the bound address: ``(host, port)`` or the path.

    Raises:
        ConnectionSpecError: a spec is malformed.
        ServerError: ``listen`` cannot be listened on.
    """
    listen_spec, upstream_spec = _as_spec(listen), _as_spec(upstream)
    listener = open_listener(listen_spec)
    recorder: _Recorder | None = None
    server: asyncio.Server | None = None
    try:
        recorder = _Recorder(upstream_spec, _RecordingFile(out, upstream_spec))
        server = await asyncio.start_server(recorder.serve, sock=listener.sock, limit=_READ_SIZE)
        _LOG.info(
            "recording", listen=listener.description, upstream=str(upstream_spec), out=str(out)
        )
        if ready is not None:
            ready(listener.sock.getsockname())
        await (stop or asyncio.Event()).wait()
    finally:
        if server is not None:
            server.close()
        if recorder is not None:
            await recorder.close()
        listener.close()


def record_sync(
    listen: str | ConnectionSpec,
    upstream: str | ConnectionSpec,
    out: str | Path,
    *,
    ready: Callable[[Any], None] | None = None,
) -> None:
    """Run :func:`record` until SIGINT or SIGTERM (the command line; main thread only)."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        signals = (signal.SIGINT, signal.SIGTERM)
        previous = {signum: signal.getsignal(signum) for signum in signals}
        for signum in signals:
            loop.add_signal_handler(signum, stop.set)
        try:
            await record(listen, upstream, out, ready=ready, stop=stop)
        finally:
            for signum in signals:
                loop.remove_signal_handler(signum)
                if previous[signum] is not None:  # None: set outside Python; leave it
                    signal.signal(signum, previous[signum])

    asyncio.run(main())


# --- replay ------------------------------------------------------------------------------


def _key(packets: list[RecordedPacket] | None) -> list[tuple[str, bytes]] | None:
    return None if packets is None else [(p.cmd, p.payload) for p in packets]


def _answer_text(packets: list[RecordedPacket] | None) -> str:
    return "(no answer)" if packets is None else ", ".join(p.describe() for p in packets)


class ComparedAnswer(BaseModel):
    """The recorded and the replayed answer to one MTA command (Progress left out).

    ``command`` is None for packets the App sent after the last command; ``recorded`` or
    ``replayed`` is None where that side sent no answer.
    """

    conn: int
    number: int  # the command's position among the connection's MTA packets, from 1
    command: RecordedPacket | None
    recorded: list[RecordedPacket] | None
    replayed: list[RecordedPacket] | None
    error: str | None = None  # the App broke the protocol, closed, or did not answer

    @property
    def matches(self) -> bool:
        """The App answered as recorded (same packets, byte for byte) and correctly."""
        return self.error is None and _key(self.recorded) == _key(self.replayed)

    def describe(self) -> str:
        """Where the command is, what it was, and both answers: a few lines of text."""
        where = f"connection {self.conn}, command {self.number}"
        if self.command is None:
            what = "after the last command"
        else:
            line = f" (line {self.command.line})" if self.command.line is not None else ""
            what = f"{self.command.cmd!r}{line}: {self.command.describe()}"
        lines = [
            f"{where} {what}",
            f"  recorded: {_answer_text(self.recorded)}",
            f"  replayed: {_answer_text(self.replayed)}",
        ]
        if self.error is not None:
            lines.append(f"  error: {self.error}")
        return "\n".join(lines)


class ReplayReport(BaseModel):
    """Every answer a replay compared, in recording order."""

    answers: list[ComparedAnswer] = Field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Every answer matched the recording."""
        return all(answer.matches for answer in self.answers)

    @property
    def mismatches(self) -> list[ComparedAnswer]:
        """The answers that differ from the recording (or broke the protocol)."""
        return [answer for answer in self.answers if not answer.matches]

    def format(self) -> str:
        """A readable summary: the count, then each mismatch with both answers."""
        total, bad = len(self.answers), self.mismatches
        if not bad:
            return f"all {total} answers match the recording"
        head = f"{len(bad)} of {total} answers differ from the recording:"
        return "\n".join([head, *(answer.describe() for answer in bad)])

    def assert_same(self) -> None:
        """Raise AssertionError, with every mismatch, unless the replay matched."""
        if not self.ok:
            raise AssertionError(self.format())


class _Turns:
    """Pairs answers with commands: which commands owe one, and where each answer ends.

    The MTA waits for one answer at a time and answers come in order, so the n-th answer
    belongs to the n-th command that owed one; the NR_* flags come from the ``O`` answer.
    """

    def __init__(self) -> None:
        self.owed: deque[int] = deque()
        self.options: SessionOptions | None = None
        self.partial: list[RecordedPacket] = []  # modifications waiting for their verdict

    def command(self, number: int, cmd: str) -> bool:
        """Note that command ``number`` was sent; return whether it owes an answer."""
        options = self.options
        owes = options.reply_expected(ord(cmd)) if options else cmd not in _NEVER_REPLY
        if owes:
            self.owed.append(number)
        return owes

    def reply(self, packet: RecordedPacket) -> tuple[int | None, list[RecordedPacket]] | None:
        """Take one milter packet; return ``(command number, answer)`` once an answer is whole."""
        if packet.cmd == "p":
            return None  # Progress: how many depends on timing, not on the milter's logic
        self.partial.append(packet)
        if packet.cmd in _MODIFICATIONS:
            return None
        if packet.cmd == "O" and len(packet.payload) >= _OPTIONS.size:
            version, actions, protocol = _OPTIONS.unpack_from(packet.payload)
            self.options = SessionOptions(
                version=version, actions=ActionFlag(actions), protocol=ProtocolFlag(protocol)
            )
        answer, self.partial = self.partial, []
        return (self.owed.popleft() if self.owed else None), answer


def _recorded_answers(connection: RecordedConnection) -> dict[int, list[RecordedPacket]]:
    turns = _Turns()
    answers: dict[int, list[RecordedPacket]] = {}
    number = 0
    for packet in connection.packets:
        if packet.dir == "mta":
            number += 1
            turns.command(number, packet.cmd)
        elif (done := turns.reply(packet)) is not None and done[0] is not None:
            answers[done[0]] = done[1]
    return answers


class _PipeTransport(asyncio.Transport):
    """Hands what the handler writes to a reader; closing ends that reader's stream."""

    def __init__(self, output: asyncio.StreamReader) -> None:
        super().__init__({"peername": "replay", "sockname": "replay"})
        self._output = output
        self._closing = False
        self.protocol: asyncio.BaseProtocol | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing:
            raise ConnectionResetError("write to a closed replay pipe")
        if data:
            self._output.feed_data(bytes(data))

    def is_closing(self) -> bool:
        return self._closing

    def get_write_buffer_size(self) -> int:
        return 0

    def pause_reading(self) -> None:
        pass  # the input is in memory already: nothing to hold back

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._output.feed_eof()
        if self.protocol is not None:
            # As a socket transport does; StreamWriter.wait_closed() waits for it.
            asyncio.get_running_loop().call_soon(self.protocol.connection_lost, None)

    def abort(self) -> None:
        self.close()


class _MemoryPipe:
    """A socket-free connection for one ConnectionHandler (``reader``, ``writer``): we
    :meth:`feed` it what the MTA sent and read its answers from ``output``."""

    def __init__(self) -> None:
        self.reader = asyncio.StreamReader(limit=_READ_SIZE)
        self.output = asyncio.StreamReader(limit=_READ_SIZE)
        self._transport = _PipeTransport(self.output)
        protocol = asyncio.StreamReaderProtocol(self.reader)
        self._transport.protocol = protocol
        protocol.connection_made(self._transport)
        loop = asyncio.get_running_loop()
        self.writer = asyncio.StreamWriter(self._transport, protocol, self.reader, loop)

    @property
    def closed(self) -> bool:
        """The handler closed the connection: it reads nothing more."""
        return self._transport.is_closing()

    def feed(self, data: bytes) -> None:
        self.reader.feed_data(data)

    def feed_eof(self) -> None:
        self.reader.feed_eof()


class _AppSide:
    """Reads the App's answers off the pipe, optionally checked as an MTA checks them."""

    def __init__(self, pipe: _MemoryPipe, mta_side_check: bool, timeout: float) -> None:
        self.pipe = pipe
        self.timeout = timeout
        self.turns = _Turns()
        self.frames = FrameDecoder(_MAX_PACKET)
        self.mta = MtaConnection() if mta_side_check else None
        self.error: str | None = None  # the first violation, reported with its answer
        self.start = asyncio.get_running_loop().time()

    def sent(self, packet: RecordedPacket) -> None:
        if self.mta is None:
            return
        try:
            self.mta.send(decode_command(ord(packet.cmd), packet.payload), force=True)
        except (ProtocolError, TypeError):
            self.mta = None  # an undecodable command: the MTA's state is unknown from here

    def _check(self, packet: RecordedPacket) -> None:
        if self.mta is None:
            return
        self.mta.receive_data(packet.frame())
        try:
            self.mta.next_reply()
        except RemoteProtocolError as exc:
            self.error, self.mta = f"an MTA would drop the milter: {exc}", None

    async def answer(self) -> list[RecordedPacket] | None:
        """The next whole answer; None at end of file. Raises TimeoutError if none comes."""
        while True:
            while (frame := self.frames.next_frame()) is not None:
                t = round(asyncio.get_running_loop().time() - self.start, 3)
                packet = RecordedPacket(dir="milter", t=t, cmd=chr(frame[0]), payload=frame[1])
                self._check(packet)
                if (done := self.turns.reply(packet)) is not None:
                    return done[1]
            async with asyncio.timeout(self.timeout):
                data = await self.pipe.output.read(_READ_SIZE)
            if not data:
                return None
            self.frames.feed(data)

    def take_error(self) -> str | None:
        error, self.error = self.error, None
        return error


async def _replay_connection(
    connection: RecordedConnection, app: App, mta_side_check: bool, wait: float
) -> list[ComparedAnswer]:
    recorded = _recorded_answers(connection)
    pipe = _MemoryPipe()
    # As the server runs it: same limit on MTA packets, handler errors answered by fallback.
    handler = ConnectionHandler(
        app, app.requirements(), conn_id=str(connection.conn), max_data_size=MAX_DATA_SIZE_1M
    )
    task = asyncio.create_task(handler.run(pipe.reader, pipe.writer))
    side = _AppSide(pipe, mta_side_check, wait)
    results: list[ComparedAnswer] = []

    def compare(
        number: int,
        command: RecordedPacket | None,
        replayed: list[RecordedPacket] | None,
        error: str | None,
    ) -> None:
        results.append(
            ComparedAnswer(
                conn=connection.conn,
                number=number,
                command=command,
                recorded=recorded.get(number),
                replayed=replayed,
                error=error,
            )
        )

    commands = [packet for packet in connection.packets if packet.dir == "mta"]
    try:
        for number, command in enumerate(commands, 1):
            if pipe.closed:
                break
            side.sent(command)
            pipe.feed(command.frame())  # as recorded, one command at a time
            if not side.turns.command(number, command.cmd):
                if number in recorded:
                    compare(number, command, None, side.take_error())
                continue
            try:
                answer = await side.answer()
            except TimeoutError:
                compare(number, command, None, f"the App did not answer within {wait} s")
                break
            if answer is None:
                why = f": {handler.error}" if handler.error is not None else ""
                compare(number, command, None, f"the App closed the connection{why}")
                break
            compare(number, command, answer, side.take_error())
        pipe.feed_eof()
        extra: list[RecordedPacket] = []
        try:
            while (answer := await side.answer()) is not None:
                extra.extend(answer)
        except TimeoutError:
            pass  # the handler is stuck; it is cancelled below
        extra.extend(side.turns.partial)
        if extra or side.error is not None:
            compare(len(commands) + 1, None, extra, side.take_error() or "unexpected packets")
        await asyncio.wait({task}, timeout=wait)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    if connection.error is not None or not connection.closed:
        # The recording stops early: what came after its last answer cannot be judged.
        last = max(recorded, default=0)
        results = [r for r in results if r.recorded is not None or r.number <= last]
    return results


async def replay(
    recording: Recording | str | Path,
    app: App,
    *,
    mta_side_check: bool = True,
    timeout: float = 30.0,  # noqa: ASYNC109 - bounds each wait for an answer, not the whole
) -> ReplayReport:
    """Replay a recording's MTA packets against ``app`` and compare its answers.

    Connections are replayed one after another, each through a :class:`ConnectionHandler`
    as the server runs it. Each recorded MTA packet is sent as recorded (also those that owe
    no answer); after each command that owes one, the App's answer is read and compared
    with the recorded answer, packet for packet, Progress left out. A connection stops where
    the App closes it. The App's startup hooks run first unless it has started already.

    Args:
        recording: a loaded :class:`Recording` or the path of a recording file.
        mta_side_check: check the App's packets as an MTA does (:class:`MtaConnection`); a
            violation makes that answer a mismatch.
        timeout: seconds to wait for each packet of an answer.

    Raises:
        RecordingError: the recording file is not valid.
    """
    if not isinstance(recording, Recording):
        recording = load_recording(recording)
    if not app._started:
        await app.run_startup()
    answers: list[ComparedAnswer] = []
    for connection in recording.connections:
        answers.extend(await _replay_connection(connection, app, mta_side_check, timeout))
    return ReplayReport(answers=answers)


def replay_sync(
    recording: Recording | str | Path,
    app: App,
    *,
    mta_side_check: bool = True,
    timeout: float = 30.0,
) -> ReplayReport:
    """:func:`replay` for code without an event loop (plain tests, the command line)."""
    return asyncio.run(replay(recording, app, mta_side_check=mta_side_check, timeout=timeout))
