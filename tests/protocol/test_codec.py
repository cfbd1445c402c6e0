"""The codec against hand-written wire vectors, and the rules the models enforce."""

from __future__ import annotations

import ipaddress
import struct
from typing import Any

import pytest
from pydantic import ValidationError

from milterapp.constants import (
    DEFAULT_MAX_DATA_SIZE,
    MAX_DATA_SIZE_256K,
    ActionFlag,
    MacroStage,
    ProtocolFlag,
)
from milterapp.errors import RemoteProtocolError
from milterapp.events import (
    AddressFamily,
    ConnectionClosed,
    EnvFrom,
    EnvRcpt,
    EsmtpArgs,
    Event,
    Header,
    Macros,
    Negotiate,
    encode_text,
)
from milterapp.protocol.codec import (
    decode_command,
    decode_response,
    encode_command,
    encode_response,
    split_body,
)
from milterapp.protocol.framing import FrameDecoder
from milterapp.replies import (
    AddHeader,
    AddRecipient,
    ChangeHeader,
    ChangeSender,
    InsertHeader,
    NegotiationReply,
    Reject,
    ReplaceBody,
    Reply,
    TempFail,
)
from tests.protocol.vectors import (
    COMMAND_VECTORS,
    DECODE_ONLY_COMMANDS,
    ENCODE_ONLY_RESPONSES,
    RESPONSE_VECTORS,
)


def frames(wire: bytes, max_data_size: int = DEFAULT_MAX_DATA_SIZE) -> list[tuple[int, bytes]]:
    """Split ``wire`` into whole packets; fail if anything is left over."""
    decoder = FrameDecoder(max_data_size)
    decoder.feed(wire)
    out = []
    while (frame := decoder.next_frame()) is not None:
        out.append(frame)
    decoder.check_eof()
    return out


def decode_one_command(wire: bytes, **kwargs: Any) -> Event:
    [(command, payload)] = frames(wire)
    return decode_command(command, payload, **kwargs)


def decode_one_response(wire: bytes) -> Reply:
    [(command, payload)] = frames(wire)
    return decode_response(command, payload)


def y_text(reply: Reject | TempFail) -> bytes:
    """The payload of the ``y`` packet for ``reply``."""
    [(command, payload)] = frames(encode_response(reply))
    assert command == ord("y")
    return payload


COMMAND_PARAMS = [pytest.param(*vector, id=vector[0]) for vector in COMMAND_VECTORS]
COMMAND_ROUND_TRIP_PARAMS = [
    pytest.param(*vector, id=vector[0])
    for vector in COMMAND_VECTORS
    if vector[0] not in DECODE_ONLY_COMMANDS
]
RESPONSE_PARAMS = [pytest.param(*vector, id=vector[0]) for vector in RESPONSE_VECTORS]
RESPONSE_DECODE_PARAMS = [
    pytest.param(*vector, id=vector[0])
    for vector in RESPONSE_VECTORS
    if vector[0] not in ENCODE_ONLY_RESPONSES
]


# --- the vectors ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "wire", [pytest.param(v[1], id=v[0]) for v in COMMAND_VECTORS + RESPONSE_VECTORS]
)
def test_vectors_length_prefixes_count_command_byte_and_payload(wire: bytes) -> None:
    # Checks the hand-counted prefixes of the vectors themselves, without the codec.
    pos = 0
    while pos < len(wire):
        (length,) = struct.unpack_from("!I", wire, pos)
        assert length >= 1
        pos += 4 + length
    assert pos == len(wire)


def test_vectors_cover_every_command_and_response_letter() -> None:
    command_letters = {wire[4:5] for _, wire, _, _ in COMMAND_VECTORS}
    response_letters = {wire[4:5] for _, wire, _, _ in RESPONSE_VECTORS}
    assert command_letters == {bytes([c]) for c in b"ODCHMRTLNBEUAQK"}
    assert response_letters == {bytes([c]) for c in b"Ocartdsp4yhim+2-ebq"}


@pytest.mark.parametrize(("vector_id", "wire", "expected", "kwargs"), COMMAND_PARAMS)
def test_decode_command_vector(
    vector_id: str, wire: bytes, expected: Event, kwargs: dict[str, Any]
) -> None:
    assert decode_one_command(wire, **kwargs) == expected


@pytest.mark.parametrize(("vector_id", "wire", "event", "kwargs"), COMMAND_ROUND_TRIP_PARAMS)
def test_encode_command_vector(
    vector_id: str, wire: bytes, event: Event, kwargs: dict[str, Any]
) -> None:
    assert encode_command(event) == wire


@pytest.mark.parametrize(("vector_id", "wire", "reply", "kwargs"), RESPONSE_PARAMS)
def test_encode_response_vector(
    vector_id: str, wire: bytes, reply: Reply, kwargs: dict[str, Any]
) -> None:
    assert encode_response(reply, **kwargs) == wire


@pytest.mark.parametrize(("vector_id", "wire", "expected", "kwargs"), RESPONSE_DECODE_PARAMS)
def test_decode_response_vector(
    vector_id: str, wire: bytes, expected: Reply, kwargs: dict[str, Any]
) -> None:
    assert decode_one_response(wire) == expected


def test_decode_response_split_body_gives_one_model_per_packet() -> None:
    [(_, wire, reply, _)] = [v for v in RESPONSE_VECTORS if v[0] in ENCODE_ONLY_RESPONSES]
    decoded = [decode_response(c, p) for c, p in frames(wire)]
    assert decoded == [ReplaceBody(chunk=c) for c in (b"abcd", b"efgh", b"ij")]
    assert isinstance(reply, ReplaceBody)
    assert b"".join(r.chunk for r in decoded if isinstance(r, ReplaceBody)) == reply.chunk


# --- commands: details the vectors do not show ------------------------------------------


def test_decode_command_optneg_ignores_bytes_after_the_first_12() -> None:
    payload = bytes.fromhex("00000006 000001ff 001fffff deadbeef")
    assert decode_command(ord("O"), payload) == Negotiate(
        version=6, actions=ActionFlag.ALL, protocol=ProtocolFlag.ALL
    )


def test_decode_command_optneg_keeps_unknown_flag_bits() -> None:
    event = decode_command(ord("O"), bytes.fromhex("00000006 ffffffff ffffffff"))
    assert isinstance(event, Negotiate)
    assert int(event.actions) == 0xFFFFFFFF
    assert int(event.protocol) == 0xFFFFFFFF


def test_decode_command_connect_ipv6_prefix_is_case_insensitive() -> None:
    event = decode_command(ord("C"), b"h\x006\x00\x19ipv6:::1\x00")
    assert event == decode_command(ord("C"), b"h\x006\x00\x19::1\x00")
    assert getattr(event, "address", None) == ipaddress.IPv6Address("::1")


def test_decode_command_connect_unix_path_is_kept_as_text() -> None:
    event = decode_command(ord("C"), b"localhost\x00L\x00\x00/run/a b\x00")
    assert getattr(event, "family", None) is AddressFamily.UNIX
    assert getattr(event, "address", None) == "/run/a b"


def test_decode_command_header_leading_space_is_recorded() -> None:
    payload = b"X-Lead\x00 x\x00"
    with_flag = decode_command(ord("L"), payload, leading_space=True)
    without_flag = decode_command(ord("L"), payload)
    assert isinstance(with_flag, Header)
    assert isinstance(without_flag, Header)
    assert with_flag.value == without_flag.value == " x"
    assert with_flag.leading_space
    assert not without_flag.leading_space


def test_encode_command_connection_closed_has_no_packet_form() -> None:
    with pytest.raises(TypeError, match="ConnectionClosed"):
        encode_command(ConnectionClosed())


# --- ReplaceBody splitting ----------------------------------------------------------------


def test_encode_response_replace_body_splits_at_default_max() -> None:
    body = (bytes(range(256)) * 600)[:150_000]
    packets = frames(encode_response(ReplaceBody(chunk=body)))
    assert [command for command, _ in packets] == [ord("b")] * 3
    assert [len(payload) for _, payload in packets] == [65535, 65535, 18930]
    assert b"".join(payload for _, payload in packets) == body


def test_encode_response_replace_body_one_packet_with_256k_max() -> None:
    body = b"0123456789" * 15_000
    wire = encode_response(ReplaceBody(chunk=body), max_data_size=MAX_DATA_SIZE_256K)
    assert wire[:5] == struct.pack("!I", 150_001) + b"b"
    assert frames(wire, MAX_DATA_SIZE_256K) == [(ord("b"), body)]


def test_encode_response_replace_body_empty_is_one_empty_packet() -> None:
    assert encode_response(ReplaceBody(chunk=b"")) == b"\x00\x00\x00\x01b"


def test_split_body_exact_multiple_has_no_empty_tail() -> None:
    assert split_body(b"x" * 131070) == [b"x" * 65535, b"x" * 65535]


def test_split_body_empty_is_one_empty_chunk() -> None:
    assert split_body(b"") == [b""]


def test_split_body_custom_size() -> None:
    assert split_body(b"abcdefg", 3) == [b"abc", b"def", b"g"]


# --- reply codes ----------------------------------------------------------------------------


def test_reject_text_gets_code_550() -> None:
    reply = Reject(text="x")
    assert reply.code == 550
    assert y_text(reply) == b"550 x\x00"


def test_tempfail_xcode_and_text_gets_code_451() -> None:
    reply = TempFail(xcode="4.7.1", text="a")
    assert reply.code == 451
    assert y_text(reply) == b"451 4.7.1 a\x00"


def test_reject_xcode_only_gets_code_550() -> None:
    reply = Reject(xcode="5.7.1")
    assert reply.code == 550
    assert y_text(reply) == b"550 5.7.1\x00"


def test_reject_without_text_is_a_plain_r() -> None:
    assert encode_response(Reject()) == b"\x00\x00\x00\x01r"
    assert encode_response(TempFail()) == b"\x00\x00\x00\x01t"


def test_reject_code_only_round_trips() -> None:
    reply = Reject(code=554)
    assert y_text(reply).startswith(b"554")
    assert decode_one_response(encode_response(reply)) == reply


def test_reject_empty_text_equals_no_text() -> None:
    assert Reject(code=550, text="") == Reject(code=550)


def test_reject_text_as_list_equals_text_with_newlines() -> None:
    assert Reject(text=["a", "b"]) == Reject(text="a\nb")


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({"code": 450}, id="reject-4xx-code"),
        pytest.param({"code": 250}, id="reject-2xx-code"),
        pytest.param({"code": 5500}, id="reject-4-digit-code"),
        pytest.param({"code": 550, "xcode": "4.7.1"}, id="reject-4-xcode"),
        pytest.param({"xcode": "2.0.0"}, id="reject-2-xcode"),
        pytest.param({"xcode": "5.7"}, id="reject-short-xcode"),
        pytest.param({"xcode": "5.7.1234"}, id="reject-long-xcode-part"),
    ],
)
def test_reject_code_class_mismatch_rejected(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValidationError, match="code"):
        Reject(**kwargs)


@pytest.mark.parametrize("xcode", ["5.\u0667.1", "5.7.\uff11"])
def test_reject_xcode_with_non_ascii_digits_rejected(xcode: str) -> None:
    with pytest.raises(ValidationError, match="xcode"):
        Reject(xcode=xcode, text="x")


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({"code": 550}, id="tempfail-5xx-code"),
        pytest.param({"code": 451, "xcode": "5.7.1"}, id="tempfail-5-xcode"),
    ],
)
def test_tempfail_code_class_mismatch_rejected(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValidationError, match="code"):
        TempFail(**kwargs)


def test_reject_32_lines_accepted_33_rejected() -> None:
    lines = [f"line {n}" for n in range(33)]
    reply = Reject(text="\n".join(lines[:32]))
    assert y_text(reply).count(b"\r\n") == 31
    with pytest.raises(ValidationError, match="33 lines"):
        Reject(text="\n".join(lines))


def test_reject_line_of_980_chars_accepted_981_rejected() -> None:
    Reject(text="x" * 980)
    with pytest.raises(ValidationError, match="longer than 980"):
        Reject(text="ok\n" + "x" * 981)


def test_reject_line_length_counts_escaped_percent() -> None:
    Reject(text="%" * 490)
    with pytest.raises(ValidationError, match="longer than 980"):
        Reject(text="%" * 491)


@pytest.mark.parametrize("text", ["a\rb", "a\r\nb", "a\r", "a\x00b"])
def test_reject_cr_or_nul_in_text_rejected(text: str) -> None:
    with pytest.raises(ValidationError, match="CR or NUL"):
        Reject(text=text)


def test_reject_multi_line_uses_dash_continuations_and_crlf() -> None:
    reply = Reject(code=554, xcode="5.7.1", text="one\ntwo\nthree")
    assert y_text(reply) == b"554-5.7.1 one\r\n554-5.7.1 two\r\n554 5.7.1 three\x00"


def test_tempfail_multi_line_without_xcode() -> None:
    assert y_text(TempFail(text="a\nb")) == b"451-a\r\n451 b\x00"


def test_reject_multi_line_has_no_trailing_crlf() -> None:
    payload = y_text(Reject(text="a\nb"))
    assert not payload.rstrip(b"\x00").endswith(b"\r\n")
    assert payload.count(b"\x00") == 1


def test_reject_percent_doubled_on_every_line() -> None:
    reply = Reject(text="50%\n%s and %%")
    assert y_text(reply) == b"550-50%%\r\n550 %%s and %%%%\x00"
    assert decode_one_response(encode_response(reply)) == reply


def test_reject_text_starting_with_xcode_reads_back_as_xcode() -> None:
    # Same bytes on the wire, so the same reply for the MTA, though not an equal model.
    wire = encode_response(Reject(text="5.7.1 Spam"))
    assert wire == encode_response(Reject(xcode="5.7.1", text="Spam"))
    assert decode_one_response(wire) == Reject(code=550, xcode="5.7.1", text="Spam")


@pytest.mark.parametrize(
    ("model", "text"), [(TempFail, "5.7.1 no"), (Reject, "4.2.0 later"), (Reject, "2.0.0 ok")]
)
def test_error_reply_text_with_foreign_xcode_refused_or_decodable(
    model: type[Reject] | type[TempFail], text: str
) -> None:
    try:
        reply = model(text=text)
    except ValidationError:
        return
    decode_one_response(encode_response(reply))


def test_reply_text_leading_xcode_becomes_the_xcode_of_every_line() -> None:
    reply = Reject(text="5.7.1 Spam\nmore")
    assert reply == Reject(code=550, xcode="5.7.1", text="Spam\nmore")
    wire = encode_response(reply)
    assert wire[5:] == b"550-5.7.1 Spam\r\n550 5.7.1 more\x00"
    assert decode_one_response(wire) == reply


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (b"550-5.7.1 Spam\r\n550 more", Reject(xcode="5.7.1", text="Spam\nmore")),
        (b"451-4.7.1 a\r\n451 b", TempFail(xcode="4.7.1", text="a\nb")),
        (b"550-5.0.0\r\n550 ", Reject(code=550, text="5.0.0\n")),
    ],
)
def test_decode_response_reply_code_with_xcode_on_first_line_only(
    text: bytes, expected: Reject | TempFail
) -> None:
    # A foreign milter may put the enhanced code on the first line only: it still applies.
    assert decode_response(ord("y"), text + b"\x00") == expected


def test_decode_response_reply_code_421_is_tempfail() -> None:
    reply = decode_response(ord("y"), b"421 4.3.2 going down\x00")
    assert reply == TempFail(code=421, xcode="4.3.2", text="going down")


def test_decode_response_reply_code_without_text() -> None:
    assert decode_response(ord("y"), b"550\x00") == Reject(code=550)


# --- header edits ------------------------------------------------------------------------


HEADER_EDITS: list[type[AddHeader] | type[InsertHeader] | type[ChangeHeader]] = [
    AddHeader,
    InsertHeader,
    ChangeHeader,
]


def header_edit(
    model: type[AddHeader] | type[InsertHeader] | type[ChangeHeader], name: str, value: str
) -> AddHeader | InsertHeader | ChangeHeader:
    if model is AddHeader:
        return AddHeader(name=name, value=value)
    if model is InsertHeader:
        return InsertHeader(index=1, name=name, value=value)
    return ChangeHeader(index=1, name=name, value=value)


@pytest.mark.parametrize("model", HEADER_EDITS)
@pytest.mark.parametrize("name", ["X:Y", "X-Y:", "X Y", " X", "X\t", "", "X\nY", "X-\u00c4"])
def test_header_edit_bad_name_rejected(
    model: type[AddHeader] | type[InsertHeader] | type[ChangeHeader], name: str
) -> None:
    with pytest.raises(ValidationError, match="header name"):
        header_edit(model, name, "v")


@pytest.mark.parametrize("model", HEADER_EDITS)
@pytest.mark.parametrize(
    "value", ["a\nb", "a\n", "a\nBcc: evil@example.com", "a\n\nb", "\nX-Evil: 1"]
)
def test_header_edit_line_break_without_whitespace_rejected(
    model: type[AddHeader] | type[InsertHeader] | type[ChangeHeader], value: str
) -> None:
    with pytest.raises(ValidationError, match="space or tab"):
        header_edit(model, "X-Test", value)


@pytest.mark.parametrize("model", HEADER_EDITS)
@pytest.mark.parametrize("value", ["a\rb", "a\r\n b", "a\x00b"])
def test_header_edit_cr_or_nul_rejected(
    model: type[AddHeader] | type[InsertHeader] | type[ChangeHeader], value: str
) -> None:
    with pytest.raises(ValidationError, match="NUL or CR"):
        header_edit(model, "X-Test", value)


@pytest.mark.parametrize("value", ["a\n b", "a\n\tb", "a\n b\n\tc", ""])
def test_header_edit_folded_value_accepted(value: str) -> None:
    reply = AddHeader(name="X-Test", value=value)
    assert encode_response(reply) == (
        struct.pack("!I", 1 + 7 + len(value) + 1) + b"hX-Test\x00" + value.encode() + b"\x00"
    )
    assert decode_one_response(encode_response(reply)) == reply


def test_change_header_index_defaults_to_1() -> None:
    assert ChangeHeader(name="X", value="").index == 1


@pytest.mark.parametrize("index", [-1, 2**32])
def test_header_edit_index_out_of_range_rejected(index: int) -> None:
    with pytest.raises(ValidationError, match="index"):
        InsertHeader(index=index, name="X", value="v")


# --- recipients, sender, negotiation reply -------------------------------------------------


def test_add_recipient_without_args_is_plus_with_args_is_2() -> None:
    assert encode_response(AddRecipient(address="<a@b>"))[4:5] == b"+"
    assert encode_response(AddRecipient(address="<a@b>", args=""))[4:5] == b"2"
    assert encode_response(AddRecipient(address="<a@b>", args="X=1"))[4:5] == b"2"


def test_decode_response_2_without_args_is_args_none() -> None:
    assert decode_response(ord("2"), b"<a@b>\x00") == AddRecipient(address="<a@b>")


@pytest.mark.parametrize("model", [AddRecipient, ChangeSender])
@pytest.mark.parametrize("address", ["", "a\nb", "a\rb", "a\x00b"])
def test_address_bad_value_rejected(
    model: type[AddRecipient] | type[ChangeSender], address: str
) -> None:
    with pytest.raises(ValidationError, match="address"):
        model(address=address)


def test_negotiation_reply_bad_macro_name_rejected() -> None:
    with pytest.raises(ValidationError, match="macro name"):
        NegotiationReply(macros={MacroStage.CONNECT: ("a b",)})


@pytest.mark.parametrize("name", ["{a\tb}", "a\x0bb", "a\xa0b"])
def test_negotiation_reply_macro_name_with_whitespace_round_trips_or_is_refused(
    name: str,
) -> None:
    try:
        reply = NegotiationReply(macros={MacroStage.EOM: (name,)})
    except ValidationError:
        return
    assert decode_one_response(encode_response(reply)) == reply


def test_decode_response_optneg_macro_list_accepts_commas() -> None:
    payload = bytes.fromhex("00000006 00000100 00000000 00000001") + b"{a},b c\x00"
    reply = decode_response(ord("O"), payload)
    assert isinstance(reply, NegotiationReply)
    assert reply.macros == {MacroStage.HELO: ("{a}", "b", "c")}


# --- Header model ------------------------------------------------------------------------


def test_header_model_from_text() -> None:
    header = Header(name="Subject", value="hi")
    assert header.raw_name == b"Subject"
    assert header.raw_value == b"hi"
    assert not header.leading_space


def test_header_model_non_utf8_value_decodes_and_reencodes() -> None:
    raw = b"caf\xe9 \xff\xfe"
    header = decode_command(ord("L"), b"Subject\x00" + raw + b"\x00")
    assert isinstance(header, Header)
    value = header.value  # must not raise
    assert isinstance(value, str)
    assert encode_text(value) == raw
    assert header.raw_value == raw
    # "Subject\0" (8) + 7 bytes + NUL = 16; len 17.
    assert encode_command(header) == b"\x00\x00\x00\x11LSubject\x00" + raw + b"\x00"


def test_header_model_non_utf8_name_decodes() -> None:
    header = decode_command(ord("L"), b"X-\xff\x00v\x00")
    assert isinstance(header, Header)
    assert header.raw_name == b"X-\xff"


def test_header_model_empty_name_rejected() -> None:
    with pytest.raises(ValidationError):
        Header(name="", value="v")


# --- Macros model ------------------------------------------------------------------------


MACROS = Macros(stage="C", values={"j": "mx.example.net", "{daemon_name}": "smtpd"})


def test_macros_lookup_with_and_without_braces() -> None:
    assert MACROS["daemon_name"] == "smtpd"
    assert MACROS["{daemon_name}"] == "smtpd"
    assert MACROS["j"] == "mx.example.net"
    assert MACROS["{j}"] == "mx.example.net"


def test_macros_get_and_contains() -> None:
    assert MACROS.get("j") == "mx.example.net"
    assert MACROS.get("{daemon_name}") == "smtpd"
    assert MACROS.get("missing") is None
    assert MACROS.get("missing", "x") == "x"
    assert "{j}" in MACROS
    assert "j" in MACROS
    assert "daemon_name" in MACROS
    assert "{i}" not in MACROS
    assert 1 not in MACROS


@pytest.mark.parametrize("name", ["i", "{i}", "{daemon_addr}", "daemon"])
def test_macros_missing_name_raises_key_error(name: str) -> None:
    with pytest.raises(KeyError, match=name.strip("{}")):
        MACROS[name]


def test_macros_empty_value_is_present() -> None:
    macros = Macros(stage="M", values={"{auth_authen}": ""})
    assert macros["auth_authen"] == ""
    assert "auth_authen" in macros


def test_macros_stage_byte_above_0x7f_round_trips_or_is_refused() -> None:
    wire = b"\x00\x00\x00\x06D\xffa\x00b\x00"
    try:
        event = decode_one_command(wire)
    except RemoteProtocolError:
        return
    assert encode_command(event) == wire


# --- EsmtpArgs ------------------------------------------------------------------------------


ARGS = EsmtpArgs.parse(["SIZE=1024", "SMTPUTF8", "BODY=8BITMIME", "X-EMPTY=", "size=2"])


def test_esmtp_args_get_is_case_insensitive() -> None:
    assert ARGS.get("size") == "1024"  # the first of duplicates
    assert ARGS.get("Size") == "1024"
    assert ARGS.get("body") == "8BITMIME"
    assert ARGS.get("x-empty") == ""
    assert ARGS.get("missing") is None
    assert ARGS.get("missing", "d") == "d"


def test_esmtp_args_keyword_without_value() -> None:
    assert "smtputf8" in ARGS
    assert "SMTPUTF8" in ARGS
    assert ARGS.get("smtputf8") is None
    assert "RET" not in ARGS
    assert 1 not in ARGS


def test_esmtp_args_order_kept() -> None:
    assert list(ARGS) == [
        ("SIZE", "1024"),
        ("SMTPUTF8", None),
        ("BODY", "8BITMIME"),
        ("X-EMPTY", ""),
        ("size", "2"),
    ]
    assert len(ARGS) == 5


def test_esmtp_args_as_strings_round_trip() -> None:
    strings = ["SIZE=1024", "SMTPUTF8", "BODY=8BITMIME", "X-EMPTY=", "size=2", "A=b=c"]
    assert EsmtpArgs.parse(strings).as_strings() == strings


def test_esmtp_args_as_dict_upper_cases_and_keeps_first() -> None:
    assert ARGS.as_dict() == {
        "SIZE": "1024",
        "SMTPUTF8": None,
        "BODY": "8BITMIME",
        "X-EMPTY": "",
    }


# --- EnvFrom / EnvRcpt ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "address", "domain"),
    [
        ("<alice@Example.ORG>", "alice@Example.ORG", "example.org"),
        ("<>", "", ""),
        ("<postmaster>", "postmaster", ""),
        ("bob@example.com", "bob@example.com", "example.com"),
        ("<@relay.example:carol@b.example>", "@relay.example:carol@b.example", "b.example"),
    ],
)
def test_env_from_address_and_domain(raw: str, address: str, domain: str) -> None:
    event = decode_command(ord("M"), encode_text(raw) + b"\x00")
    assert isinstance(event, EnvFrom)
    assert event.raw == raw
    assert event.address == address
    assert event.domain == domain


def test_env_from_built_from_address_derives_raw() -> None:
    event = EnvFrom(address="a@b.example")
    assert event.raw == "<a@b.example>"
    assert encode_command(event) == b"\x00\x00\x00\x0fM<a@b.example>\x00"


def test_env_from_null_sender_built_from_address() -> None:
    event = EnvFrom(address="")
    assert event.raw == "<>"
    assert event.domain == ""


def test_env_rcpt_args_from_list() -> None:
    event = EnvRcpt(address="a@b", args=["NOTIFY=NEVER"])
    assert event.args.get("notify") == "NEVER"
    assert decode_one_command(encode_command(event)) == event
