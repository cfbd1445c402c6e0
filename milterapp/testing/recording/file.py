"""The recording file: its format, its models, the loader and the line writer.

A recording is one JSON object per line (``t``: seconds since the connection opened;
``payload``: base64)::

    {"format": "milterapp-recording", "version": 1, "recorded_at": "...", "upstream": "..."}
    {"conn": 1, "event": "open"}
    {"conn": 1, "dir": "mta", "t": 0.0, "cmd": "O", "payload": "AAAABgAAAf8AH///"}
    {"conn": 1, "dir": "milter", "t": 0.002, "cmd": "O", "payload": "AAAABgAAAP8AD6PC"}
    {"conn": 1, "event": "close", "t": 0.513}

A close marker has an ``"error"`` when the connection could not be recorded in full: the
milter was unreachable, or a stream was not made of milter packets (it is still relayed).

:mod:`~milterapp.testing.recording.proxy` writes recordings;
:mod:`~milterapp.testing.recording.replay` plays them back against an App.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Final, Literal, TypeAlias

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from milterapp.errors import MilterError, ProtocolError
from milterapp.protocol.codec import decode_command, decode_response
from milterapp.protocol.framing import encode_frame
from milterapp.spec import ConnectionSpec

__all__ = [
    "MAX_PACKET",
    "RECORDING_FORMAT",
    "RECORDING_VERSION",
    "Direction",
    "RecordedConnection",
    "RecordedPacket",
    "Recording",
    "RecordingError",
    "RecordingWriter",
    "load_recording",
]

RECORDING_FORMAT: Final = "milterapp-recording"
RECORDING_VERSION: Final = 1
Direction: TypeAlias = Literal["mta", "milter"]

# Postfix reads milter packets up to INT_MAX/2 and sends headers uncapped: frame both ways
# with a limit no real packet reaches, so that only a broken stream stops the recording.
MAX_PACKET: Final = 1 << 30


class RecordingError(MilterError, ValueError):
    """A file is not a valid recording; the message names the file and the line."""


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


# --- reading -----------------------------------------------------------------------------


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


# --- writing -----------------------------------------------------------------------------


class RecordingWriter:
    """The recording being written: header first, then one line per packet or marker."""

    def __init__(self, path: str | Path, upstream: ConnectionSpec) -> None:
        self._file: IO[str] = Path(path).open("w", encoding="utf-8")  # noqa: SIM115
        recorded_at = datetime.now(UTC).isoformat(timespec="seconds")
        self._write(
            {
                "format": RECORDING_FORMAT,
                "version": RECORDING_VERSION,
                "recorded_at": recorded_at,
                "upstream": str(upstream),
            }
        )

    def marker(
        self,
        conn: int,
        event: Literal["open", "close"],
        t: float | None = None,
        error: str | None = None,
    ) -> None:
        """Write an open or close marker (``t`` and ``error`` only when given)."""
        line: dict[str, Any] = {"conn": conn, "event": event}
        if t is not None:
            line["t"] = t
        if error is not None:
            line["error"] = error
        self._write(line)

    def packet(
        self, conn: int, direction: Direction, t: float, command: int, payload: bytes
    ) -> None:
        """Write one packet: its command byte as a letter, its payload in base64."""
        self._write(
            {
                "conn": conn,
                "dir": direction,
                "t": t,
                "cmd": chr(command),
                "payload": base64.b64encode(payload).decode("ascii"),
            }
        )

    def _write(self, line: dict[str, Any]) -> None:
        # One write and one flush with no await in between: lines of concurrent connections
        # never interleave, and a killed recorder leaves everything up to the last line.
        self._file.write(json.dumps(line) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()
