"""Replay a recording against an App and compare its answers with the recorded ones.

:func:`replay` feeds a recording's MTA packets to an App, through the server's own
connection handler over an in-memory pipe, and compares the App's answers with the recorded
ones: a session of a real Postfix or Sendmail (recorded by :mod:`milterapp.testing.recording.proxy`)
becomes a regression test.
"""

from __future__ import annotations

import asyncio
import struct
from collections import deque
from pathlib import Path
from typing import Final

from pydantic import BaseModel, Field

from milterapp.app import App
from milterapp.constants import MAX_DATA_SIZE_1M, MODIFICATIONS, ActionFlag, ProtocolFlag
from milterapp.errors import ProtocolError, RemoteProtocolError
from milterapp.protocol.codec import decode_command
from milterapp.protocol.framing import FrameDecoder
from milterapp.protocol.mta import MtaConnection
from milterapp.protocol.negotiation import UNNEGOTIATED, SessionOptions
from milterapp.server.connection import Connection
from milterapp.testing.pipe import READ_SIZE, connect_protocol
from milterapp.testing.recording.file import (
    MAX_PACKET,
    RecordedConnection,
    RecordedPacket,
    Recording,
    load_recording,
)

__all__ = ["ComparedAnswer", "ReplayReport", "replay", "replay_sync"]

_MODIFICATIONS: Final = frozenset(code.value.decode() for code in MODIFICATIONS)
_OPTIONS: Final = struct.Struct("!III")


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
        owes = (options or UNNEGOTIATED).reply_expected(ord(cmd))
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


class _AppSide:
    """Reads the App's answers off the pipe, optionally checked as an MTA checks them."""

    def __init__(self, output: asyncio.StreamReader, mta_side_check: bool, timeout: float) -> None:
        self.output = output
        self.timeout = timeout
        self.turns = _Turns()
        self.frames = FrameDecoder(MAX_PACKET)
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
                data = await self.output.read(READ_SIZE)
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
    # As the server runs it: same limit on MTA packets, handler errors answered by fallback.
    handler = Connection(
        app, app.requirements(), conn_id=str(connection.conn), max_data_size=MAX_DATA_SIZE_1M
    )
    # The MTA's end is ours: what we write there, the handler reads from its own end.
    output, mta = connect_protocol(handler, "replay", "replay")
    side = _AppSide(output, mta_side_check, wait)
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
            if handler.transport is None or handler.transport.is_closing():
                # the handler closed the connection: it reads no more
                break
            side.sent(command)
            mta.write(command.frame())  # as recorded, one command at a time
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
        mta.write_eof()  # not close(): that would end the output before the last answers
        extra: list[RecordedPacket] = []
        try:
            while (answer := await side.answer()) is not None:
                extra.extend(answer)
        except TimeoutError:
            pass  # the handler is stuck; it is cancelled below
        extra.extend(side.turns.partial)
        if extra or side.error is not None:
            compare(len(commands) + 1, None, extra, side.take_error() or "unexpected packets")
        await asyncio.wait({handler.done}, timeout=wait)
    finally:
        handler.abort()  # a handler still stuck is stopped
        await asyncio.wait({handler.done}, timeout=wait)
        mta.close()
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

    Connections are replayed one after another, each through a
    :class:`~milterapp.server.connection.Connection` as the server runs it. Each recorded
    MTA packet is sent as recorded (also those that owe no answer); after each command that
    owes one, the App's answer is read and compared with the recorded answer, packet for
    packet, Progress left out. A connection stops where
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
    if not app.serving.started:
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
