"""FrameDecoder: large packets that span reads are assembled in a buffer of their own."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from milterapp.errors import RemoteProtocolError
from milterapp.protocol.framing import ASSEMBLE_FROM, FrameDecoder


def packet(command: int, payload: bytes) -> bytes:
    """One packet, built by hand rather than with the code under test."""
    return struct.pack("!I", len(payload) + 1) + bytes([command]) + payload


CHUNK = bytes(range(256)) * 256  # 64 KiB, every byte value, position-dependent
BODY = packet(ord("B"), CHUNK[:65535])


def frames(decoder: FrameDecoder) -> list[tuple[int, bytes]]:
    out = []
    while (frame := decoder.next_frame()) is not None:
        out.append(frame)
    return out


def test_the_rest_of_a_large_packet_is_read_into_its_own_buffer() -> None:
    decoder = FrameDecoder()
    head = 20_000
    decoder.feed(memoryview(bytearray(BODY[:head])))
    assert frames(decoder) == []
    decoder.release()
    target = decoder.read_target()
    assert target is not None
    assert len(target) == len(BODY) - head  # exactly the rest: nothing of the next packet
    assert decoder.buffered == head

    target[:1000] = BODY[head : head + 1000]
    decoder.target_filled(1000)
    assert frames(decoder) == []  # not whole yet
    rest = decoder.read_target()
    assert rest is not None
    assert len(rest) == len(BODY) - head - 1000
    rest[:] = BODY[head + 1000 :]
    decoder.target_filled(len(rest))

    assert decoder.read_target() is None
    assert frames(decoder) == [(ord("B"), CHUNK[:65535])]
    assert decoder.buffered == 0
    assert decoder.read_target() is None


def test_bytes_fed_as_usual_complete_the_assembly_and_the_next_packet_follows() -> None:
    decoder = FrameDecoder()
    eom = packet(ord("E"), b"")
    wire = BODY + eom
    decoder.feed(wire[:30_000])
    assert frames(decoder) == []
    assert decoder.read_target() is not None
    decoder.feed(wire[30_000:])  # the rest of the chunk and the next packet in one read
    assert frames(decoder) == [(ord("B"), CHUNK[:65535]), (ord("E"), b"")]
    assert decoder.buffered == 0


def test_a_peer_that_only_announces_a_large_packet_gets_no_buffer_for_it() -> None:
    # Allocating the announced size for a few bytes would let a peer make us hold far more
    # than it sent: assembly waits until an eighth of the packet is in.
    decoder = FrameDecoder(max_data_size=1024 * 1024 - 1)
    announced = packet(ord("B"), bytes(1024 * 1024 - 1))
    decoder.feed(announced[: ASSEMBLE_FROM + 100])
    assert frames(decoder) == []
    assert decoder.read_target() is None
    decoder.feed(announced[ASSEMBLE_FROM + 100 : 200_000])
    assert frames(decoder) == []
    assert decoder.read_target() is not None
    decoder.feed(announced[200_000:])
    assert frames(decoder) == [(ord("B"), bytes(1024 * 1024 - 1))]


def test_filling_more_than_the_target_holds_is_refused() -> None:
    decoder = FrameDecoder()
    decoder.feed(BODY[:20_000])
    frames(decoder)
    target = decoder.read_target()
    assert target is not None
    with pytest.raises(ValueError, match="more than the read target can hold"):
        decoder.target_filled(len(target) + 1)
    with pytest.raises(ValueError, match="more than the read target can hold"):
        FrameDecoder().target_filled(1)


def test_end_of_file_inside_an_assembled_packet_is_an_error() -> None:
    decoder = FrameDecoder()
    decoder.feed(BODY[:20_000])
    frames(decoder)
    with pytest.raises(RemoteProtocolError, match="20000 bytes unread"):
        decoder.check_eof()


payload_sizes = st.sampled_from([0, 1, 100, ASSEMBLE_FROM - 1, ASSEMBLE_FROM, 30_000, 65535])


@settings(max_examples=150, deadline=None)
@given(
    sizes=st.lists(payload_sizes, min_size=1, max_size=6),
    cuts=st.lists(st.integers(64, 70_000), max_size=12),
    use_target=st.lists(st.booleans(), min_size=1, max_size=12),
)
def test_any_split_and_any_use_of_the_read_target_gives_the_same_packets(
    sizes: list[int], cuts: list[int], use_target: list[bool]
) -> None:
    expected = [(ord("B"), CHUNK[:size]) for size in sizes]
    wire = b"".join(packet(command, payload) for command, payload in expected)
    decoder = FrameDecoder()
    got: list[tuple[int, bytes]] = []
    position = turn = 0
    while position < len(wire):
        turn += 1
        size = cuts[turn % len(cuts)] if cuts else len(wire)
        target = decoder.read_target()
        if target is not None and use_target[turn % len(use_target)]:
            size = min(size, len(target), len(wire) - position)
            target[:size] = wire[position : position + size]
            decoder.target_filled(size)
        else:
            piece = bytearray(wire[position : position + size])
            size = len(piece)
            decoder.feed(memoryview(piece))  # a lent buffer, as the server's reads are
            got.extend(frames(decoder))
            decoder.release()
            piece[:] = b"\xff" * size  # the buffer is reused for the next read
        position += size
        got.extend(frames(decoder))
        assert decoder.empty == (decoder.buffered == 0)
        assert decoder.partial == (decoder.buffered > 0)
    assert got == expected
    assert decoder.buffered == 0
