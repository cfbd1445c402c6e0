"""MacroTable: macro values per stage, kept as libmilter keeps them (protocol reference §3)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from milterapp.errors import LimitExceededError, RemoteProtocolError
from milterapp.events import macro_name
from milterapp.protocol.codec import encode_command
from milterapp.protocol.commands import decode_macros
from milterapp.protocol.machine import MilterConnection
from milterapp.protocol.macros import MacroTable
from milterapp.protocol.negotiation import Requirements, negotiate
from milterapp.protocol.stages import SEQUENCE
from tests.protocol.helpers import POSTFIX_OFFER, negotiated_connection


def full_table() -> MacroTable:
    table = MacroTable()
    for letter in SEQUENCE:
        table.define(letter, {f"{{at_{letter}}}": letter.lower()})
    return table


def test_macro_table_empty() -> None:
    table = MacroTable()

    assert len(table) == 0
    assert dict(table) == {}
    assert "j" not in table
    assert table.get("j") is None
    with pytest.raises(KeyError, match="j"):
        table["j"]


def test_macro_table_lookup_with_and_without_braces() -> None:
    table = MacroTable()
    table.define("C", {"j": "mx.example.net", "{daemon_name}": "smtpd", "{v}": "Postfix"})

    assert table["j"] == "mx.example.net"
    assert table["{j}"] == "mx.example.net"
    assert table["daemon_name"] == "smtpd"
    assert table["{daemon_name}"] == "smtpd"
    assert table["v"] == "Postfix"
    assert "{daemon_name}" in table
    assert "daemon_name" in table
    assert "{if_addr}" not in table


def test_macro_table_names_kept_without_braces() -> None:
    table = MacroTable()
    table.define("C", {"j": "mx", "{daemon_addr}": "192.0.2.25", "_": "client [198.51.100.7]"})

    assert dict(table) == {"j": "mx", "daemon_addr": "192.0.2.25", "_": "client [198.51.100.7]"}
    assert table.as_dict() == dict(table)
    assert set(table) == {"j", "daemon_addr", "_"}
    assert len(table) == 3
    assert table.stage("C") == {
        "j": "mx",
        "daemon_addr": "192.0.2.25",
        "_": "client [198.51.100.7]",
    }


def test_macro_table_empty_braces_are_a_name() -> None:
    table = MacroTable()
    table.define("C", {"{}": "x"})

    assert table["{}"] == "x"


def test_macro_table_newest_stage_wins() -> None:
    table = MacroTable()
    table.define("C", {"i": "from-connect", "j": "mx"})
    table.define("M", {"{i}": "from-mail"})
    table.define("R", {"i": "from-rcpt"})

    assert table["i"] == "from-rcpt"
    assert table["j"] == "mx"
    assert dict(table) == {"i": "from-rcpt", "j": "mx"}
    assert len(table) == 2
    assert table.stage("M") == {"i": "from-mail"}


def test_macro_table_redefining_a_stage_replaces_it() -> None:
    table = MacroTable()
    table.define("R", {"{rcpt_addr}": "bob@example.net", "{rcpt_host}": "mx.example.net"})
    table.define("R", {"{rcpt_addr}": "carol@example.net"})

    assert table["rcpt_addr"] == "carol@example.net"
    assert "rcpt_host" not in table
    assert table.stage("R") == {"rcpt_addr": "carol@example.net"}


def test_macro_table_redefined_stage_becomes_newest() -> None:
    table = MacroTable()
    table.define("H", {"x": "helo"})
    table.define("M", {"x": "mail"})
    table.define("H", {"x": "helo again"})

    assert table["x"] == "helo again"


def test_macro_table_define_copies_values() -> None:
    values = {"j": "mx"}
    table = MacroTable()
    table.define("C", values)
    values["j"] = "changed"

    assert table["j"] == "mx"


def test_macro_table_enter_mail_drops_later_stages() -> None:
    table = full_table()

    table.enter("M")

    assert [s for s in SEQUENCE if table.stage(s)] == ["C", "H", "M"]
    assert "at_R" not in table
    assert table["at_M"] == "m"


@pytest.mark.parametrize("letter", list(SEQUENCE))
def test_macro_table_enter_keeps_stages_up_to_itself(letter: str) -> None:
    table = full_table()

    table.enter(letter)

    kept = SEQUENCE[: SEQUENCE.index(letter) + 1]
    assert [s for s in SEQUENCE if table.stage(s)] == list(kept)


def test_macro_table_enter_ignores_other_letters() -> None:
    table = full_table()
    table.define("U", {"u": "unknown"})

    table.enter("U")
    table.enter("D")

    assert len(table) == len(SEQUENCE) + 1


def test_macro_table_reset_message_keeps_connect_and_helo() -> None:
    table = full_table()
    table.define("U", {"u": "unknown"})

    table.reset_message()

    assert [s for s in SEQUENCE if table.stage(s)] == ["C", "H"]
    assert table.stage("U") == {"u": "unknown"}
    assert dict(table) == {"at_C": "c", "at_H": "h", "u": "unknown"}


def test_macro_table_clear() -> None:
    table = full_table()

    table.clear()

    assert len(table) == 0
    assert dict(table) == {}
    assert all(not table.stage(s) for s in SEQUENCE)


def test_macro_table_stage_of_undefined_letter_is_empty() -> None:
    table = MacroTable()

    assert table.stage("E") == {}
    assert len(table.stage("E")) == 0


def test_macro_table_mapping_behaviour() -> None:
    table = MacroTable()
    table.define("C", {"j": "mx"})
    table.define("M", {"{mail_addr}": "alice@example.org"})

    assert table.get("mail_addr") == "alice@example.org"
    assert table.get("{rcpt_addr}", "none") == "none"
    assert sorted(table.keys()) == ["j", "mail_addr"]
    assert sorted(table.values()) == ["alice@example.org", "mx"]
    assert sorted(table.items()) == [("j", "mx"), ("mail_addr", "alice@example.org")]
    assert table == {"j": "mx", "mail_addr": "alice@example.org"}
    assert "MacroTable(" in repr(table)


# --- D packets kept undecoded until a lookup (the server's way: macro_events=False) ---------


def _server_machine() -> MilterConnection:
    return negotiated_connection(macro_events=False)


def _d_packet(payload: bytes) -> bytes:
    return struct.pack("!I", len(payload) + 1) + b"D" + payload


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"", "lacks its stage letter"),
        (b"\x00j\x00v\x00", "stage letter is a zero byte"),
        (b"Cj", "macro name or value is not NUL"),
        (b"Cj\x00mx.example", "macro name or value is not NUL"),
        (b"Cj\x00", "macro 'j' has no value"),
        (b"Cj\x00v\x00k\x00", "macro 'k' has no value"),
    ],
)
def test_a_malformed_packet_is_refused_when_it_arrives_not_at_lookup(
    payload: bytes, message: str
) -> None:
    conn = _server_machine()
    conn.receive_data(_d_packet(payload))
    with pytest.raises(RemoteProtocolError, match=message):
        conn.next_event()


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=40) | st.lists(st.binary(max_size=6), max_size=7).map(b"\x00".join))
def test_a_packet_kept_undecoded_reads_back_as_decoding_it_at_once(payload: bytes) -> None:
    try:
        expected = decode_macros(payload)
    except RemoteProtocolError:
        expected = None
    conn = _server_machine()
    conn.receive_data(_d_packet(payload))
    if expected is None:
        with pytest.raises(RemoteProtocolError):
            conn.next_event()
        return
    assert conn.next_event() is None  # no event: the values went into the table
    stage, values = expected
    assert conn.macros.stage(stage) == {macro_name(n): v for n, v in values.items()}
    for name, value in values.items():
        assert conn.macros[name] == value


def test_undecoded_packets_keep_the_order_of_definition() -> None:
    conn = _server_machine()
    conn.receive_data(_d_packet(b"Cj\x00mx\x00{daemon_name}\x00d1\x00"))
    conn.receive_data(_d_packet(b"Hj\x00helo-j\x00"))
    conn.next_event()
    table = conn.macros
    assert "'H': {'j': 'helo-j'}" in repr(table)  # decoded for display
    assert table["j"] == "helo-j"  # the newest stage wins
    assert table["daemon_name"] == table["{daemon_name}"] == "d1"
    assert table.as_dict() == {"j": "helo-j", "daemon_name": "d1"}
    assert list(table) == ["j", "daemon_name"]


def test_the_macro_limit_counts_the_pairs_of_an_undecoded_packet() -> None:
    conn = MilterConnection(macro_events=False, max_macros_per_packet=2)
    conn.receive_data(encode_command(POSTFIX_OFFER))
    conn.next_event()
    conn.send(negotiate(POSTFIX_OFFER, Requirements()))
    conn.receive_data(_d_packet(b"Ca\x001\x00b\x002\x00c\x003\x00"))
    with pytest.raises(LimitExceededError, match="3 macros in one packet"):
        conn.next_event()


@settings(deadline=None)
@given(
    st.integers(1, 4),
    st.lists(st.tuples(st.binary(max_size=2), st.binary(max_size=2)), max_size=6),
)
def test_the_macro_limit_holds_for_packets_of_every_size(
    limit: int, pairs: list[tuple[bytes, bytes]]
) -> None:
    """Short packets skip the count of their pairs: none of them can hold too many."""
    pairs = [(name.replace(b"\0", b"n"), value.replace(b"\0", b"v")) for name, value in pairs]
    conn = MilterConnection(macro_events=False, max_macros_per_packet=limit)
    conn.receive_data(encode_command(POSTFIX_OFFER))
    conn.next_event()
    conn.send(negotiate(POSTFIX_OFFER, Requirements()))
    conn.receive_data(_d_packet(b"R" + b"".join(n + b"\0" + v + b"\0" for n, v in pairs)))
    if len(pairs) > limit:
        with pytest.raises(LimitExceededError, match=f"{len(pairs)} macros in one packet"):
            conn.next_event()
    else:
        assert conn.next_event() is None  # taken into the table


names = st.sampled_from(["i", "{i}", "j", "{j}", "ii", "{", "}", "é"])
values = st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters="\0"), max_size=3)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.lists(st.tuples(names, names | values), max_size=4), max_size=3),
    names,
)
def test_a_lookup_in_undecoded_packets_is_the_decoded_lookup(
    packets: list[list[tuple[str, str]]], name: str
) -> None:
    """A name at the head of a packet is read without decoding the packet: same answer."""
    undecoded, decoded = MacroTable(), MacroTable()
    for letter, pairs in zip("CHMRTE", packets, strict=False):
        payload = letter.encode() + b"".join(
            f"{key}\0{value}\0".encode("utf-8", "surrogateescape") for key, value in pairs
        )
        undecoded.define_packet(letter, payload)
        decoded.define_packet(letter, payload)
        decoded.stage(letter)  # decodes it
    assert undecoded.get(name, "-") == decoded.get(name, "-")
    assert (name in undecoded) == (name in decoded)
