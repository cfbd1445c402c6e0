"""Property tests: every model survives encode then decode; framing survives any split."""

from __future__ import annotations

import io
import ipaddress
import itertools
import re
import struct

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from milterapp.constants import (
    DEFAULT_MAX_DATA_SIZE,
    MAX_DATA_SIZE_1M,
    ActionFlag,
    MacroStage,
    ProtocolFlag,
)
from milterapp.errors import FrameTooLargeError, ProtocolError
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
    QuitNoClose,
    Unknown,
    decode_text,
)
from milterapp.protocol.codec import (
    decode_command,
    decode_response,
    encode_command,
    encode_response,
)
from milterapp.protocol.framing import FrameDecoder, encode_frame
from milterapp.protocol.responses import body_chunks, split_body
from milterapp.replies import (
    Accept,
    AddHeader,
    AddRecipient,
    ChangeHeader,
    ChangeSender,
    Continue,
    DeleteRecipient,
    Discard,
    InsertHeader,
    NegotiationReply,
    Progress,
    Quarantine,
    Reject,
    ReplaceBody,
    Reply,
    Shutdown,
    Skip,
    TempFail,
)

# --- helpers ------------------------------------------------------------------------------


def packet(command: int, payload: bytes) -> bytes:
    """One packet, built here by hand rather than with the code under test."""
    return struct.pack("!I", len(payload) + 1) + bytes([command]) + payload


def one_frame(wire: bytes) -> tuple[int, bytes]:
    decoder = FrameDecoder()
    decoder.feed(wire)
    frame = decoder.next_frame()
    assert frame is not None
    assert decoder.next_frame() is None
    assert decoder.buffered == 0
    return frame


# --- strategies: text -----------------------------------------------------------------------

u32 = st.integers(0, 0xFFFFFFFF)


def text(exclude: str = "", min_size: int = 0, max_size: int = 30) -> st.SearchStrategy[str]:
    """Wire text without NUL (and without ``exclude``): valid Unicode, or bytes that are not
    UTF-8 decoded with surrogateescape as the codec does."""
    banned = "\x00" + exclude
    unicode = st.text(
        st.characters(exclude_categories=("Cs",), exclude_characters=banned),
        min_size=min_size,
        max_size=max_size,
    )
    raw = st.binary(min_size=min_size, max_size=max_size).map(
        lambda b: bytes(c for c in b if chr(c) not in banned)
    )
    return unicode | raw.filter(lambda b: len(b) >= min_size).map(decode_text)


wire_text = text()
line_text = text(exclude="\r\n")

# --- strategies: commands -------------------------------------------------------------------

negotiates = st.builds(
    Negotiate,
    version=u32,
    actions=u32.map(ActionFlag),
    protocol=u32.map(ProtocolFlag),
)
# The stage is one byte: any character from U+0001 to U+00FF.
macros = st.builds(
    Macros,
    stage=st.characters(min_codepoint=1, max_codepoint=0xFF),
    values=st.dictionaries(wire_text, wire_text, max_size=6),
)
ports = st.integers(0, 0xFFFF)
connects = st.one_of(
    st.builds(Connect, hostname=wire_text, family=st.just(AddressFamily.UNKNOWN)),
    st.builds(
        Connect,
        hostname=wire_text,
        family=st.just(AddressFamily.INET),
        port=ports,
        address=st.ip_addresses(v=4),
    ),
    st.builds(
        Connect,
        hostname=wire_text,
        family=st.just(AddressFamily.INET6),
        port=ports,
        address=st.ip_addresses(v=6),
    ),
    st.builds(
        Connect,
        hostname=wire_text,
        family=st.just(AddressFamily.UNIX),
        port=ports,
        address=wire_text,
    ),
)
esmtp_arg_lists = st.lists(
    st.one_of(
        wire_text,
        st.sampled_from(["SIZE=1024", "SMTPUTF8", "BODY=8BITMIME", "NOTIFY=NEVER", "X="]),
    ),
    max_size=6,
)
envelopes = st.one_of(
    st.builds(EnvFrom.from_raw, wire_text, esmtp_arg_lists),
    st.builds(EnvRcpt.from_raw, wire_text, esmtp_arg_lists),
    st.builds(EnvFrom, address=wire_text, args=esmtp_arg_lists),
)
headers = st.builds(
    Header,
    name=text(min_size=1),
    value=wire_text,
    leading_space=st.booleans(),
)
chunks = st.binary(max_size=300) | st.integers(0, DEFAULT_MAX_DATA_SIZE).map(bytes)
commands: st.SearchStrategy[Event] = st.one_of(
    negotiates,
    macros,
    connects,
    st.builds(Helo, name=wire_text),
    envelopes,
    headers,
    st.builds(Body, chunk=chunks),
    st.builds(EndOfMessage, chunk=chunks),
    st.builds(Unknown, line=wire_text),
    st.sampled_from([Data(), EndOfHeaders(), Abort(), Quit(), QuitNoClose()]),
)

# --- strategies: responses ------------------------------------------------------------------

# A first line that starts like an enhanced status code would be read back as one.
_XCODE_LIKE = re.compile(r"[0-9]+\.[0-9]+\.[0-9]+")
reply_lines = st.lists(
    st.one_of(
        line_text,
        st.sampled_from(["%", "%%", "100% sure", "%s", " lead", "trail ", "-", "550 x", ""]),
    ),
    max_size=32,
)


@st.composite
def error_replies(draw: st.DrawFn) -> Reject | TempFail:
    model = draw(st.sampled_from([Reject, TempFail]))
    digit = int(model.first_digit)
    code = draw(st.none() | st.integers(0, 99).map(lambda n: 100 * digit + n))
    xcode = draw(
        st.none()
        | st.tuples(st.integers(0, 999), st.integers(0, 999)).map(
            lambda parts: f"{digit}.{parts[0]}.{parts[1]}"
        )
    )
    lines = draw(reply_lines)
    if xcode is None and lines:
        lines[0] = draw(line_text.filter(lambda line: not _XCODE_LIKE.match(line)))
    return model(code=code, xcode=xcode, text="\n".join(lines) if lines else None)


header_names = st.text(
    st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters=":"),
    min_size=1,
    max_size=30,
)


@st.composite
def header_values(draw: st.DrawFn) -> str:
    first = draw(line_text)
    rest = draw(st.lists(st.tuples(st.sampled_from([" ", "\t"]), line_text), max_size=3))
    return first + "".join("\n" + space + line for space, line in rest)


addresses = text(exclude="\r\n", min_size=1)
esmtp_arg_strings = st.none() | text(exclude="\r\n")
responses: st.SearchStrategy[Reply] = st.one_of(
    st.sampled_from(
        [Continue(), Accept(), Discard(), Skip(), Progress(), Shutdown(), Reject(), TempFail()]
    ),
    error_replies(),
    st.builds(AddHeader, name=header_names, value=header_values()),
    st.builds(InsertHeader, index=u32, name=header_names, value=header_values()),
    st.builds(ChangeHeader, index=u32, name=header_names, value=header_values()),
    st.builds(AddRecipient, address=addresses, args=esmtp_arg_strings),
    st.builds(DeleteRecipient, address=addresses),
    st.builds(ChangeSender, address=addresses, args=esmtp_arg_strings),
    st.builds(ReplaceBody, chunk=chunks),
    st.builds(Quarantine, reason=addresses),
    st.builds(
        NegotiationReply,
        version=u32,
        actions=u32.map(ActionFlag),
        protocol=u32.map(ProtocolFlag),
        # Macro names: printable, no whitespace, no commas (anything else is refused).
        macros=st.dictionaries(
            st.sampled_from(MacroStage),
            st.lists(
                text(exclude=",", min_size=1, max_size=15).filter(
                    lambda name: all(c.isprintable() and not c.isspace() for c in name)
                ),
                max_size=5,
            ).map(tuple),
        ),
    ),
)

# --- round trips ----------------------------------------------------------------------------


@settings(deadline=None)
@given(commands)
def test_codec_command_round_trip(event: Event) -> None:
    command, payload = one_frame(encode_command(event))
    assert bytes([command]) == event.command
    leading_space = event.leading_space if isinstance(event, Header) else False
    assert decode_command(command, payload, leading_space=leading_space) == event


@settings(deadline=None)
@given(responses)
def test_codec_response_round_trip(reply: Reply) -> None:
    command, payload = one_frame(encode_response(reply))
    assert decode_response(command, payload) == reply


@settings(deadline=None)
@given(st.builds(ReplaceBody, chunk=st.binary(max_size=2000)), st.integers(1, 700))
def test_codec_replace_body_split_joins_back(reply: ReplaceBody, max_data_size: int) -> None:
    decoder = FrameDecoder(max_data_size)
    decoder.feed(encode_response(reply, max_data_size=max_data_size))
    parts = []
    while (frame := decoder.next_frame()) is not None:
        decoded = decode_response(*frame)
        assert isinstance(decoded, ReplaceBody)
        assert 0 < len(decoded.chunk) <= max_data_size or decoded.chunk == reply.chunk == b""
        parts.append(decoded.chunk)
    assert decoder.buffered == 0
    assert b"".join(parts) == reply.chunk
    assert len(parts) == max(1, -(-len(reply.chunk) // max_data_size))


# --- framing --------------------------------------------------------------------------------

frame_lists = st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=200)), max_size=8)


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *sorted(cuts), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def drain(decoder: FrameDecoder, pieces: list[bytes]) -> list[tuple[int, bytes]]:
    """Feed ``pieces`` one by one, collecting every frame; check ``buffered`` on the way."""
    out = []
    pending = decoder.buffered
    for piece in [b"", *pieces]:
        decoder.feed(piece)
        pending += len(piece)
        while (frame := decoder.next_frame()) is not None:
            out.append(frame)
            pending -= 5 + len(frame[1])
        assert decoder.buffered == pending
        assert decoder.empty == (pending == 0)  # the per-packet path trusts this flag
        assert decoder.partial == (pending > 0)
    return out


@settings(deadline=None)
@given(frame_lists, st.data())
def test_frame_decoder_random_split_yields_same_frames(
    frames: list[tuple[int, bytes]], data: st.DataObject
) -> None:
    stream = b"".join(packet(c, p) for c, p in frames)
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=30))
    decoder = FrameDecoder()
    assert drain(decoder, split_at(stream, cuts)) == frames
    assert decoder.buffered == 0
    decoder.check_eof()


@settings(deadline=None)
@given(frame_lists, st.data())
def test_frame_decoder_reading_a_reused_buffer_yields_same_frames(
    frames: list[tuple[int, bytes]], data: st.DataObject
) -> None:
    """As the server reads: each piece lands in one shared buffer, lent as a memoryview,
    released after the frames it completed are taken, then overwritten by the next read."""
    stream = b"".join(packet(c, p) for c, p in frames)
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=30))
    buffer = bytearray(max([len(piece) for piece in split_at(stream, cuts)] + [1]))
    view = memoryview(buffer)
    decoder = FrameDecoder()
    got = []
    for piece in split_at(stream, cuts):
        view[: len(piece)] = piece
        decoder.feed(view[: len(piece)])
        while (frame := decoder.next_frame()) is not None:
            assert type(frame[1]) is bytes
            got.append(frame)
        decoder.release()
        view[:] = b"\xff" * len(buffer)  # the next read overwrites everything
    assert got == frames
    decoder.check_eof()


@settings(deadline=None)
@given(frame_lists)
def test_frame_decoder_one_byte_at_a_time_yields_same_frames(
    frames: list[tuple[int, bytes]],
) -> None:
    stream = b"".join(packet(c, p) for c, p in frames)
    decoder = FrameDecoder()
    assert drain(decoder, [stream[i : i + 1] for i in range(len(stream))]) == frames
    decoder.check_eof()


@settings(deadline=None)
@given(frame_lists)
def test_frame_decoder_whole_stream_at_once_yields_same_frames(
    frames: list[tuple[int, bytes]],
) -> None:
    stream = b"".join(packet(c, p) for c, p in frames)
    decoder = FrameDecoder()
    decoder.feed(bytearray(stream))
    assert drain(decoder, []) == frames


def take_all(decoder: FrameDecoder, pieces: list[bytes | memoryview]) -> list[tuple[int, bytes]]:
    """As :func:`drain`, taking each read's packets in one call, as the state machine does."""
    out: list[tuple[int, bytes]] = []
    for piece in pieces:
        decoder.feed(piece)
        while taken := decoder.take_frames():
            assert all(type(payload) is bytes for _, payload in taken)
            out.extend(taken)
        assert decoder.empty == (decoder.buffered == 0)
        decoder.release()
    return out


@settings(deadline=None)
@given(frame_lists, st.data())
def test_take_frames_gives_what_next_frame_gives(
    frames: list[tuple[int, bytes]], data: st.DataObject
) -> None:
    stream = b"".join(packet(c, p) for c, p in frames)
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=30))
    lend = data.draw(st.booleans())  # each read as a view of a buffer that is reused
    buffer = bytearray(len(stream) + 1)
    pieces: list[bytes | memoryview] = []
    decoder = FrameDecoder()
    got: list[tuple[int, bytes]] = []
    for piece in split_at(stream, cuts):
        if lend:
            buffer[: len(piece)] = piece
            pieces = [memoryview(buffer)[: len(piece)]]
        else:
            pieces = [piece]
        got.extend(take_all(decoder, pieces))
        buffer[:] = b"\xff" * len(buffer)  # the next read overwrites everything
    assert got == frames
    assert decoder.buffered == 0
    decoder.check_eof()


def test_take_frames_stops_before_a_refused_packet() -> None:
    decoder = FrameDecoder(max_data_size=10)
    decoder.feed(packet(ord("D"), b"ok") + packet(ord("B"), b"x" * 11) + packet(ord("E"), b""))
    assert decoder.take_frames() == [(ord("D"), b"ok")]
    with pytest.raises(FrameTooLargeError, match="11 bytes exceeds the maximum of 10"):
        decoder.take_frames()


def test_take_frames_hands_out_a_packet_that_spans_reads() -> None:
    decoder = FrameDecoder()
    stream = packet(ord("R"), b"<a@b.c>\0") + packet(ord("E"), b"")
    decoder.feed(stream[:7])
    assert decoder.take_frames() == []
    assert decoder.partial
    decoder.feed(stream[7:])
    assert decoder.take_frames() == [(ord("R"), b"<a@b.c>\0")]
    assert decoder.take_frames() == [(ord("E"), b"")]
    assert decoder.take_frames() == []
    assert not decoder.partial


@given(st.integers(0, 255), st.binary(max_size=300))
def test_encode_frame_matches_hand_built_packet(command: int, payload: bytes) -> None:
    assert encode_frame(bytes([command]), payload) == packet(command, payload)


def test_frame_decoder_accepts_memoryview_and_bytearray_pieces() -> None:
    stream = packet(ord("B"), b"abc") + packet(ord("E"), b"")
    decoder = FrameDecoder()
    decoder.feed(memoryview(stream)[:6])
    decoder.feed(bytearray(stream[6:]))
    assert drain(decoder, []) == [(ord("B"), b"abc"), (ord("E"), b"")]


def test_frame_decoder_1mib_frame_in_1kib_pieces() -> None:
    payload = (bytes(range(256)) * 4096)[:MAX_DATA_SIZE_1M]
    stream = packet(ord("B"), payload) + packet(ord("E"), b"")
    decoder = FrameDecoder(max_data_size=MAX_DATA_SIZE_1M)
    got = []
    for start in range(0, len(stream), 1024):
        decoder.feed(stream[start : start + 1024])
        while (frame := decoder.next_frame()) is not None:
            got.append(frame)
        if start + 1024 < len(stream) - 5:
            assert got == []
    assert got == [(ord("B"), payload), (ord("E"), b"")]
    decoder.check_eof()


def test_frame_decoder_64kib_frame_one_byte_at_a_time() -> None:
    payload = (bytes(range(251)) * 262)[:DEFAULT_MAX_DATA_SIZE]
    stream = packet(ord("B"), payload)
    decoder = FrameDecoder()
    for i in range(len(stream) - 1):
        decoder.feed(stream[i : i + 1])
        assert decoder.next_frame() is None
    decoder.feed(stream[-1:])
    assert decoder.next_frame() == (ord("B"), payload)
    assert decoder.next_frame() is None
    decoder.check_eof()


@settings(deadline=None)
@given(st.binary(max_size=3000), st.integers(1, 700))
def test_body_chunks_of_bytes_and_of_a_file_are_the_same(body: bytes, size: int) -> None:
    from_bytes = list(body_chunks(body, size))
    from_file = list(body_chunks(io.BytesIO(body), size))
    assert from_bytes == from_file == split_body(body, size)
    assert b"".join(from_bytes) == body
    assert all(0 < len(chunk) <= size for chunk in from_bytes) or from_bytes == [b""]


_OCTET = st.one_of(
    st.integers(0, 999).map(str), st.sampled_from(["00", "01", "007", "", " 1", "٣", "1e"])
)


@given(
    st.one_of(
        st.lists(_OCTET, min_size=3, max_size=5).map(".".join),
        st.text(alphabet="0123456789. x", max_size=20),
    )
)
@example("192.0.2.10")
@example("0.0.0.0")
@example("255.255.255.255")
@example("01.2.3.4")
@example("1.2.3.00")
@example("256.1.1.1")
@example("1.2.3")
@example("1.2.3.٤")
def test_an_ipv4_connect_address_decodes_as_ipaddress_judges_it(text: str) -> None:
    # CONNECT's IPv4 address takes a quick path for the usual dotted quad; whatever the text,
    # the address (or the refusal) is the one ipaddress gives.
    payload = b"client\x004" + struct.pack(">H", 25) + text.encode() + b"\x00"
    try:
        expected: object = ipaddress.IPv4Address(text)
    except ValueError:
        expected = None
    try:
        event = decode_command(ord("C"), payload)
    except ProtocolError:
        assert expected is None
    else:
        assert isinstance(event, Connect)
        assert event.address == expected
