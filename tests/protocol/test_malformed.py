"""Malformed input: every problem is a RemoteProtocolError that says what and where.

The corpus gives, for each malformed packet, the message fragment that must name the problem
and the byte offset of the offending field in the payload.
"""

from __future__ import annotations

import contextlib
import re
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from milterapp.constants import (
    DEFAULT_MAX_DATA_SIZE,
    MAX_DATA_SIZE_256K,
)
from milterapp.errors import FrameTooLargeError, RemoteProtocolError
from milterapp.protocol.codec import decode_command, decode_response
from milterapp.protocol.framing import FrameDecoder

OPTNEG_12 = bytes.fromhex("00000006 000001ff 001fffff")

# (id, command letter, payload, message fragment (regex), offset in the payload)
MALFORMED_COMMANDS: list[tuple[str, bytes, bytes, str, int]] = [
    # -- strings without their NUL
    ("connect-hostname-unterminated", b"C", b"mail.example.com", "hostname is not NUL", 0),
    ("connect-address-unterminated", b"C", b"h\x004\x00\x19192.0.2.1", "address is not NUL", 5),
    ("helo-unterminated", b"H", b"mail.example.com", "HELO name is not NUL", 0),
    ("mail-address-unterminated", b"M", b"<a@b>", "not NUL-terminated", 0),
    ("mail-arg-unterminated", b"M", b"<a@b>\x00SIZE=1", "not NUL-terminated", 6),
    ("rcpt-address-unterminated", b"R", b"<a@b>", "not NUL-terminated", 0),
    ("rcpt-arg-unterminated", b"R", b"<a@b>\x00NOTIFY=NEVER", "not NUL-terminated", 6),
    ("header-name-unterminated", b"L", b"Subject", "header name is not NUL", 0),
    ("header-value-unterminated", b"L", b"Subject\x00hi", "header value is not NUL", 8),
    ("unknown-unterminated", b"U", b"FOO bar", "command line is not NUL", 0),
    ("macro-name-unterminated", b"D", b"Cj", "macro name or value is not NUL", 1),
    ("macro-value-unterminated", b"D", b"Cj\x00mx.example", "macro name or value is not NUL", 3),
    # -- connect
    ("connect-family-missing", b"C", b"h\x00", "family byte missing", 2),
    ("connect-family-bad-letter", b"C", b"h\x00X\x00\x19a\x00", "unknown address family 'X'", 2),
    ("connect-port-missing", b"C", b"h\x004", "port truncated", 3),
    ("connect-port-truncated", b"C", b"h\x004\x00", "port truncated", 3),
    ("connect-ipv4-bad", b"C", b"h\x004\x00\x19999.1.1.1\x00", "bad INET address '999.1.1.1'", 5),
    ("connect-ipv4-empty", b"C", b"h\x004\x00\x19\x00", "bad INET address ''", 5),
    ("connect-ipv6-bad", b"C", b"h\x006\x00\x192001:db8:::1\x00", "bad INET6 address", 5),
    ("connect-ipv6-is-ipv4", b"C", b"h\x006\x00\x19192.0.2.1\x00", "bad INET6 address", 5),
    ("connect-ipv6-prefix-only", b"C", b"h\x006\x00\x19IPv6:\x00", "bad INET6 address", 5),
    (
        "connect-trailing-bytes",
        b"C",
        b"h\x004\x00\x19192.0.2.1\x00xx",
        "2 unexpected bytes after the last field",
        15,
    ),
    ("connect-unknown-trailing-bytes", b"C", b"h\x00U\x00\x00", "2 unexpected bytes", 3),
    # -- helo, unknown: one string only
    ("helo-two-strings", b"H", b"a\x00b\x00", "2 unexpected bytes", 2),
    ("unknown-two-strings", b"U", b"a\x00b\x00", "2 unexpected bytes", 2),
    # -- mail, rcpt
    ("mail-empty", b"M", b"", "address missing", 0),
    ("rcpt-empty", b"R", b"", "address missing", 0),
    # -- header
    ("header-empty-name", b"L", b"\x00value\x00", "empty header name", 0),
    ("header-empty-payload", b"L", b"", "header name is not NUL", 0),
    ("header-third-string", b"L", b"X\x00v\x00w\x00", "2 unexpected bytes", 4),
    # -- negotiation
    ("optneg-empty", b"O", b"", "negotiation payload is 0 bytes; needs 12", 0),
    ("optneg-11-bytes", b"O", OPTNEG_12[:11], "negotiation payload is 11 bytes; needs 12", 0),
    # -- macros
    ("macro-no-stage", b"D", b"", "lacks its stage letter", 0),
    ("macro-odd-strings", b"D", b"Cj\x00", "macro 'j' has no value", 3),
    ("macro-odd-strings-3", b"D", b"Cj\x00v\x00k\x00", "macro 'k' has no value", 7),
    # -- commands without payload
    ("data-payload", b"T", b"x", "1 unexpected bytes after the last field", 0),
    ("eoh-payload", b"N", b"\x00", "1 unexpected bytes after the last field", 0),
    ("abort-payload", b"A", b"xy", "2 unexpected bytes after the last field", 0),
    ("quit-payload", b"Q", b"x", "1 unexpected bytes after the last field", 0),
    ("quit-nc-payload", b"K", b"x", "1 unexpected bytes after the last field", 0),
    # -- unknown command bytes
    ("unknown-command-Z", b"Z", b"", "unknown command byte 0x5a", 0),
    ("unknown-command-nul", b"\x00", b"", "unknown command byte 0x00", 0),
    ("unknown-command-ff", b"\xff", b"abc", "unknown command byte 0xff", 0),
    ("unknown-command-response-letter", b"c", b"", "unknown command byte 0x63", 0),
]

# (id, response letter, payload, message fragment (regex), offset in the payload)
MALFORMED_RESPONSES: list[tuple[str, bytes, bytes, str, int]] = [
    ("unknown-response-Z", b"Z", b"", "unknown response byte 0x5a", 0),
    ("unknown-response-conn-fail", b"f", b"", "unknown response byte 0x66", 0),
    ("unknown-response-setsymlist", b"l", b"", "unknown response byte 0x6c", 0),
    ("unknown-response-command-letter", b"C", b"", "unknown response byte 0x43", 0),
    ("continue-payload", b"c", b"x", "carries 1 unexpected bytes", 0),
    ("accept-payload", b"a", b"xy", "carries 2 unexpected bytes", 0),
    ("reject-payload", b"r", b"\x00", "carries 1 unexpected bytes", 0),
    ("tempfail-payload", b"t", b"x", "carries 1 unexpected bytes", 0),
    ("discard-payload", b"d", b"x", "carries 1 unexpected bytes", 0),
    ("skip-payload", b"s", b"x", "carries 1 unexpected bytes", 0),
    ("progress-payload", b"p", b"x", "carries 1 unexpected bytes", 0),
    ("shutdown-payload", b"4", b"x", "carries 1 unexpected bytes", 0),
    ("replycode-2xx", b"y", b"250 ok\x00", "must start with a 4xx or 5xx code, not '250 '", 0),
    ("replycode-no-nul", b"y", b"550 no", "reply text is not NUL", 0),
    ("replycode-empty", b"y", b"", "reply text is not NUL", 0),
    ("replycode-empty-text", b"y", b"\x00", "must start with a 4xx or 5xx code", 0),
    ("replycode-2-digits", b"y", b"55 no\x00", "must start with a 4xx or 5xx code", 0),
    ("replycode-no-separator", b"y", b"550no\x00", "must start with a 4xx or 5xx code", 0),
    ("replycode-trailing-bytes", b"y", b"550 no\x00x", "1 unexpected bytes", 7),
    ("replycode-xcode-class", b"y", b"450 5.7.1 no\x00", "invalid content: .*xcode", 0),
    ("replycode-cr-in-line", b"y", b"550 a\rb\x00", "invalid content: .*CR", 0),
    ("insheader-index-truncated", b"i", b"\x00\x00\x01", "header index truncated", 0),
    ("chgheader-index-truncated", b"m", b"", "header index truncated", 0),
    ("insheader-value-unterminated", b"i", b"\x00\x00\x00\x01X\x00v", "header value is not", 6),
    ("chgheader-third-string", b"m", b"\x00\x00\x00\x01X\x00v\x00w\x00", "unexpected bytes", 8),
    ("addheader-name-unterminated", b"h", b"X-Spam", "header name is not NUL", 0),
    ("addheader-colon-in-name", b"h", b"X:Y\x00v\x00", "invalid content: .*header name", 0),
    ("addheader-injection", b"h", b"X\x00a\nBcc: x\x00", "invalid content: .*space or tab", 0),
    ("addrcpt-par-three-strings", b"2", b"a\x00b\x00c\x00", "got 3 strings", 0),
    ("addrcpt-par-empty", b"2", b"", "got 0 strings", 0),
    ("addrcpt-par-unterminated", b"2", b"a\x00b", "not NUL-terminated", 2),
    ("chgfrom-three-strings", b"e", b"a\x00b\x00c\x00", "got 3 strings", 0),
    ("addrcpt-two-strings", b"+", b"a\x00b\x00", "2 unexpected bytes", 2),
    ("addrcpt-empty-address", b"+", b"\x00", "invalid content: .*address", 0),
    ("delrcpt-unterminated", b"-", b"<a@b>", "recipient is not NUL", 0),
    ("quarantine-empty-reason", b"q", b"\x00", "invalid content: .*quarantine reason", 0),
    ("quarantine-unterminated", b"q", b"spam", "quarantine reason is not NUL", 0),
    ("optneg-reply-short", b"O", OPTNEG_12[:11], "negotiation reply is 11 bytes", 0),
    (
        "optneg-reply-unknown-stage-9",
        b"O",
        OPTNEG_12 + b"\x00\x00\x00\x09i\x00",
        "unknown macro stage 9",
        12,
    ),
    ("optneg-reply-stage-truncated", b"O", OPTNEG_12 + b"\x00\x00", "macro stage truncated", 12),
    (
        "optneg-reply-list-unterminated",
        b"O",
        OPTNEG_12 + b"\x00\x00\x00\x00j",
        "macro list is not NUL",
        16,
    ),
]


@pytest.mark.parametrize(
    ("letter", "payload", "message", "offset"),
    [pytest.param(*case[1:], id=case[0]) for case in MALFORMED_COMMANDS],
)
def test_decode_command_malformed(letter: bytes, payload: bytes, message: str, offset: int) -> None:
    with pytest.raises(RemoteProtocolError, match=message) as info:
        decode_command(letter[0], payload)
    assert type(info.value) is RemoteProtocolError
    assert info.value.command == chr(letter[0])
    assert info.value.offset == offset
    assert f"(command {chr(letter[0])!r}, offset {offset})" in str(info.value)


@pytest.mark.parametrize(
    ("letter", "payload", "message", "offset"),
    [pytest.param(*case[1:], id=case[0]) for case in MALFORMED_RESPONSES],
)
def test_decode_response_malformed(
    letter: bytes, payload: bytes, message: str, offset: int
) -> None:
    with pytest.raises(RemoteProtocolError, match=message) as info:
        decode_response(letter[0], payload)
    assert type(info.value) is RemoteProtocolError
    assert info.value.command == chr(letter[0])
    assert info.value.offset == offset


def test_decode_response_validation_error_is_not_chained() -> None:
    # The pydantic error is translated, not attached: callers see one clean exception.
    with pytest.raises(RemoteProtocolError) as info:
        decode_response(ord("h"), b"X:Y\x00v\x00")
    assert info.value.__cause__ is None
    assert info.value.__context__ is None  # raised after the except block: nothing to show


@pytest.mark.parametrize(
    "packet",
    [
        pytest.param((ord("C"), b"host\x00X"), id="unknown family"),
        pytest.param((ord("C"), b"host\x004\x00\x19not-an-ip\x00"), id="bad address"),
    ],
)
def test_decode_command_errors_are_not_chained(packet: tuple[int, bytes]) -> None:
    # The same in the compiled build, where mypyc does not apply "raise ... from None".
    with pytest.raises(RemoteProtocolError) as info:
        decode_command(*packet)
    assert info.value.__cause__ is None
    assert info.value.__context__ is None


# --- framing ------------------------------------------------------------------------------


def test_frame_decoder_length_zero_rejected() -> None:
    decoder = FrameDecoder()
    decoder.feed(b"\x00\x00\x00\x00")
    with pytest.raises(FrameTooLargeError, match="packet length 0"):
        decoder.next_frame()


@pytest.mark.parametrize(
    ("max_data_size", "length"),
    [
        (DEFAULT_MAX_DATA_SIZE, 65537),
        (DEFAULT_MAX_DATA_SIZE, 0xFFFFFFFF),
        (MAX_DATA_SIZE_256K, 262145),
        (10, 12),
    ],
)
def test_frame_decoder_too_large_rejected_from_length_bytes_alone(
    max_data_size: int, length: int
) -> None:
    decoder = FrameDecoder(max_data_size)
    decoder.feed(struct.pack("!I", length))
    with pytest.raises(
        FrameTooLargeError,
        match=re.escape(f"{length - 1} bytes exceeds the maximum of {max_data_size} bytes"),
    ):
        decoder.next_frame()


@pytest.mark.parametrize(
    ("max_data_size", "length"),
    [(DEFAULT_MAX_DATA_SIZE, 65536), (MAX_DATA_SIZE_256K, 262144), (10, 11)],
)
def test_frame_decoder_largest_length_accepted(max_data_size: int, length: int) -> None:
    decoder = FrameDecoder(max_data_size)
    decoder.feed(struct.pack("!I", length))
    assert decoder.next_frame() is None
    decoder.feed(b"B" + b"x" * (length - 1))
    assert decoder.next_frame() == (ord("B"), b"x" * (length - 1))


def test_frame_decoder_too_large_after_good_frame() -> None:
    decoder = FrameDecoder()
    decoder.feed(b"\x00\x00\x00\x01T" + struct.pack("!I", 65537))
    assert decoder.next_frame() == (ord("T"), b"")
    with pytest.raises(FrameTooLargeError, match="65536 bytes exceeds"):
        decoder.next_frame()


def test_frame_decoder_too_large_split_length_bytes() -> None:
    decoder = FrameDecoder()
    for byte in struct.pack("!I", 65537)[:3]:
        decoder.feed(bytes([byte]))
        assert decoder.next_frame() is None
    decoder.feed(b"\x01")
    with pytest.raises(FrameTooLargeError):
        decoder.next_frame()


def test_frame_too_large_error_is_remote_protocol_error() -> None:
    assert issubclass(FrameTooLargeError, RemoteProtocolError)


@pytest.mark.parametrize(
    ("data", "unread"),
    [
        (b"\x00", 1),
        (b"\x00\x00\x00", 3),
        (b"\x00\x00\x00\x05", 4),
        (b"\x00\x00\x00\x05Oab", 7),
        (b"\x00\x00\x00\x01T\x00\x00\x00\x02H", 5),
    ],
)
def test_frame_decoder_check_eof_partial_frame(data: bytes, unread: int) -> None:
    decoder = FrameDecoder()
    decoder.feed(data)
    while decoder.next_frame() is not None:
        pass
    with pytest.raises(RemoteProtocolError, match=f"middle of a packet \\({unread} bytes unread"):
        decoder.check_eof()


def test_frame_decoder_check_eof_clean() -> None:
    decoder = FrameDecoder()
    decoder.check_eof()
    decoder.feed(b"\x00\x00\x00\x01T\x00\x00\x00\x01N")
    assert decoder.next_frame() == (ord("T"), b"")
    assert decoder.next_frame() == (ord("N"), b"")
    decoder.check_eof()


# --- fuzzing: nothing but RemoteProtocolError, ever ----------------------------------------

COMMAND_LETTERS = list(b"ODCHMRTLNBEUAQK")
RESPONSE_LETTERS = list(b"Ocartdsp4yhim+2-ebq")
letters = st.sampled_from(COMMAND_LETTERS + RESPONSE_LETTERS) | st.integers(0, 255)
# Payloads assembled from pieces that mean something to some decoder, so that the fuzzing
# gets past the first check of each.
payload_pieces = st.one_of(
    st.binary(max_size=8),
    st.just(b"\x00"),
    st.sampled_from(
        [
            b"4",
            b"6",
            b"L",
            b"U",
            b"X",
            b"IPv6:",
            b"::1",
            b"192.0.2.1",
            b"999.1.1.1",
            b"/tmp/s",
            b"550 ",
            b"421-",
            b"250 ",
            b"5.7.1 ",
            b"4.7.1 ",
            b"2.0.0 ",
            b"\r\n",
            b"%%",
            b"%",
            b"=",
            b"<>",
            b"<a@b>",
            b"SIZE=1",
            b"X-H",
            b"a:b",
            b"\n ",
            b"\n",
            b"\r",
            b"\xff\xfe",
            b"\xc3",
            b"{j}",
            b", ",
            b"\t",
            OPTNEG_12,
            struct.pack("!I", 2),
            struct.pack("!I", 6),
            struct.pack("!I", 9),
            struct.pack("!I", 0xFFFFFFFF),
            struct.pack("!H", 25),
        ]
    ),
)
payloads = st.lists(payload_pieces, max_size=12).map(b"".join)


def decode_all(command: int, payload: bytes, leading_space: bool) -> None:
    """Run every decoder on one packet; only RemoteProtocolError may come out."""
    for decode in (
        lambda: decode_command(command, payload, leading_space=leading_space),
        lambda: decode_response(command, payload),
    ):
        with contextlib.suppress(RemoteProtocolError):
            decode()


@settings(deadline=None)
@given(letters, payloads, st.booleans())
def test_decode_fuzz_raises_only_remote_protocol_error(
    command: int, payload: bytes, leading_space: bool
) -> None:
    decode_all(command, payload, leading_space)


@settings(deadline=None)
@given(letters, st.binary(max_size=64))
def test_decode_fuzz_random_bytes_raises_only_remote_protocol_error(
    command: int, payload: bytes
) -> None:
    decode_all(command, payload, False)


@st.composite
def streams(draw: st.DrawFn) -> bytes:
    """Packets with right or wrong lengths, and junk, back to back."""
    parts = []
    for _ in range(draw(st.integers(0, 6))):
        command = draw(letters)
        payload = draw(payloads)
        length = draw(
            st.just(len(payload) + 1) | st.integers(0, len(payload) + 3) | st.integers(0, 2**32 - 1)
        )
        parts.append(struct.pack("!I", length) + bytes([command]) + payload)
    parts.append(draw(st.binary(max_size=8)))
    return b"".join(parts)


@settings(deadline=None)
@given(st.one_of(streams(), st.binary(max_size=300)), st.integers(1, 64), st.booleans())
def test_frame_decoder_fuzz_raises_only_remote_protocol_error(
    stream: bytes, piece_size: int, leading_space: bool
) -> None:
    decoder = FrameDecoder()
    try:
        for start in range(0, len(stream), piece_size):
            decoder.feed(stream[start : start + piece_size])
            while (frame := decoder.next_frame()) is not None:
                decode_all(*frame, leading_space)
        decoder.check_eof()
    except RemoteProtocolError:
        pass
