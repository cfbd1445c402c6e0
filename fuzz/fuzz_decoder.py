"""Coverage-guided fuzz target for the decoding side of the protocol core (atheris).

One input drives, in turn:

1. :class:`FrameDecoder`, fed in pieces, and every packet it hands out through both
   :func:`decode_command` and :func:`decode_response`;
2. a :class:`MilterConnection` (negotiated first, unless the input says otherwise) fed the same
   bytes in pieces, with :meth:`~MilterConnection.next_event` drained after each piece and
   every event that waits for an answer given one, as the server does;
3. end of file, and the events that follow it.

Any exception other than :class:`milterapp.errors.ProtocolError` is a crash; so is a
machine that keeps handing out events, or that does not stay failed after a protocol error.

Input layout: byte 0 chooses the set-up (how the bytes are split, what the milter asks for in
negotiation, whether the stream negotiates itself, which replies the milter gives); the rest
is what the MTA sends.

Run (atheris installed; the first directory receives new inputs, so make it a scratch one)::

    mkdir -p /tmp/fuzz-work
    python fuzz/fuzz_decoder.py -max_total_time=600 -artifact_prefix=fuzz/crashes/ \\
        /tmp/fuzz-work fuzz/corpus

Replay files (no atheris needed): ``python fuzz/fuzz_decoder.py --replay FILE...``.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final


def _instrumentation() -> Any:
    """Coverage instrumentation of milterapp's modules when fuzzing (not when replaying)."""
    if __name__ == "__main__" and sys.argv[1:2] != ["--replay"]:
        import atheris

        return atheris.instrument_imports(include=["milterapp"])
    return contextlib.nullcontext()


with _instrumentation():
    from milterapp.constants import (
        MAX_DATA_SIZE_1M,
        ActionFlag,
        ConnectionState,
        ProtocolFlag,
    )
    from milterapp.errors import NegotiationError, ProtocolError
    from milterapp.events import Event, Negotiate
    from milterapp.protocol.codec import decode_command, decode_response, encode_command
    from milterapp.protocol.framing import FrameDecoder
    from milterapp.protocol.machine import MilterConnection
    from milterapp.protocol.mta import DEFAULT_OFFER
    from milterapp.protocol.negotiation import Requirements, negotiate
    from milterapp.replies import (
        Accept,
        AddHeader,
        ChangeHeader,
        Continue,
        Discard,
        Progress,
        Reject,
        ReplaceBody,
        Reply,
        Skip,
        TempFail,
    )

__all__ = ["check", "main"]

#: What the milter asks for in negotiation (bits 2-3 of byte 0).
REQUIREMENTS: Final = (
    Requirements(),  # every event, every reply
    Requirements(events=frozenset({"header", "body"}), no_reply=frozenset({"header"})),
    Requirements(leading_space=True, rejected_recipients=True, max_data_size=1048575, skip=False),
    Requirements(
        events=frozenset({"envrcpt", "eoh"}),
        no_reply=frozenset({"envrcpt"}),
        actions=ActionFlag.ADDHDRS | ActionFlag.CHGBODY,
    ),
)
#: What the MTA offers when the harness negotiates (bit 4 of byte 0 picks the second).
OFFERS: Final = (
    DEFAULT_OFFER,
    Negotiate(version=2, actions=ActionFlag.ADDHDRS, protocol=ProtocolFlag.V1),
)
#: Replies tried, in turn, for commands that wait for one (bit 6 of byte 0); Continue when
#: the machine refuses the one tried.
REPLIES: Final[tuple[Reply, ...]] = (
    Continue(),
    Reject(),
    Continue(),
    TempFail(),
    Skip(),
    Accept(),
    Discard(),
)
#: Sent before the verdict at end of message when the milter may.
MODIFICATIONS: Final[tuple[Reply, ...]] = (
    Progress(),
    AddHeader(name="X-Fuzz", value="1"),
    ChangeHeader(name="Subject", value="fuzz"),
    ReplaceBody(chunk=b"new body\r\n"),
)


def _pieces(config: int, data: bytes) -> Iterator[bytes]:
    """Split ``data`` as the config says (bits 0-1): whole, by 1, by 7, or by growing sizes."""
    mode = config & 0b11
    if mode == 0:
        yield data
        return
    at, size = 0, 1
    while at < len(data):
        step = 1 if mode == 1 else 7 if mode == 2 else size
        yield data[at : at + step]
        at += step
        size = size * 2 + 1
        if size > 4096:
            size = 1


def check_frames(config: int, data: bytes) -> None:
    """Frame ``data`` and decode every packet both as a command and as a response."""
    leading_space = bool(config & 0x20)
    decoder = FrameDecoder(4096 if config & 0x80 else MAX_DATA_SIZE_1M)
    try:
        for piece in _pieces(config, data):
            decoder.feed(piece)
            while (frame := decoder.next_frame()) is not None:
                command, payload = frame
                with contextlib.suppress(ProtocolError):
                    assert decode_command(command, payload, leading_space=leading_space) is not None
                with contextlib.suppress(ProtocolError):
                    assert decode_response(command, payload) is not None
        decoder.check_eof()
    except ProtocolError:
        pass


def _answer(machine: MilterConnection, event: Event, config: int, turn: int) -> None:
    """Answer the pending command as a milter would (choice varies with config and turn)."""
    if isinstance(event, Negotiate):
        needs = REQUIREMENTS[(config >> 2) & 0b11]
        try:
            reply = negotiate(event, needs)
        except NegotiationError:
            raise ProtocolError("negotiation failed: the server closes here") from None
        try:
            machine.send(reply)
        except ProtocolError as exc:  # negotiate() made a reply the machine refuses: a bug
            raise AssertionError(f"negotiated reply {reply!r} refused: {exc}") from exc
        return
    if machine.pending_command == "E" and config & 0x40:
        for modification in MODIFICATIONS[: turn % (len(MODIFICATIONS) + 1)]:
            # Not granted, or not allowed here: the server logs it and goes on.
            with contextlib.suppress(ProtocolError):
                machine.send(modification)
    reply = REPLIES[turn % len(REPLIES)] if config & 0x40 else Continue()
    try:
        machine.send(reply)
    except ProtocolError:
        machine.send(Continue())  # must always be accepted for a command owed a reply
    assert not machine.awaiting_reply


def _drain(machine: MilterConnection, config: int, budget: int) -> int:
    """Hand out events until the machine needs data; return the budget left."""
    while True:
        try:
            event = machine.next_event()
        except ProtocolError:
            assert machine.state is ConnectionState.ERROR, machine.state
            raise
        if event is None:
            assert not machine.awaiting_reply
            return budget
        assert isinstance(event, Event), event
        budget -= 1
        assert budget >= 0, "the machine keeps handing out events"
        if machine.awaiting_reply:
            _answer(machine, event, config, budget)


def check_machine(config: int, data: bytes) -> bool:
    """Run ``data`` through a negotiated :class:`MilterConnection`, as the server does.

    Returns True if the session ran to its end, False if it ended in a protocol error.
    """
    machine = MilterConnection(max_data_size=None if config & 0x80 else MAX_DATA_SIZE_1M)
    # Each packet gives at most a few events (its own and synthesised aborts).
    budget = 4 * len(data) + 16
    try:
        if not config & 0x10:  # negotiate first: the fuzzer's bytes come after
            machine.receive_data(encode_command(OFFERS[(config >> 5) & 1]))
            budget = _drain(machine, config, budget)
            assert machine.state is ConnectionState.CONNECTING
        for piece in _pieces(config, data):
            machine.receive_data(piece)
            budget = _drain(machine, config, budget)
        machine.receive_data(b"")
        _drain(machine, config, budget)
        assert machine.state is ConnectionState.CLOSED, machine.state
        assert machine.next_event() is None
    except ProtocolError:
        return False
    return True


def check(data: bytes) -> None:
    """The fuzz target: raises (other than ProtocolError) only on a bug."""
    if not data:
        return
    config, stream = data[0], data[1:]
    check_frames(config, stream)
    check_machine(config, stream)


def main(argv: list[str]) -> None:
    if len(argv) > 1 and argv[1] == "--replay":
        for name in argv[2:]:
            print(f"replaying {name}")
            check(Path(name).read_bytes())
        return
    import atheris  # the replay above works without it

    atheris.Setup(argv, check)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
