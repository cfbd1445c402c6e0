"""MacroTable: macro values per stage, kept as libmilter keeps them (protocol reference §3)."""

from __future__ import annotations

import pytest

from milterapp.protocol.macros import STAGE_ORDER, MacroTable


def full_table() -> MacroTable:
    table = MacroTable()
    for letter in STAGE_ORDER:
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

    assert [s for s in STAGE_ORDER if table.stage(s)] == ["C", "H", "M"]
    assert "at_R" not in table
    assert table["at_M"] == "m"


@pytest.mark.parametrize("letter", list(STAGE_ORDER))
def test_macro_table_enter_keeps_stages_up_to_itself(letter: str) -> None:
    table = full_table()

    table.enter(letter)

    kept = STAGE_ORDER[: STAGE_ORDER.index(letter) + 1]
    assert [s for s in STAGE_ORDER if table.stage(s)] == list(kept)


def test_macro_table_enter_ignores_other_letters() -> None:
    table = full_table()
    table.define("U", {"u": "unknown"})

    table.enter("U")
    table.enter("D")

    assert len(table) == len(STAGE_ORDER) + 1


def test_macro_table_reset_message_keeps_connect_and_helo() -> None:
    table = full_table()
    table.define("U", {"u": "unknown"})

    table.reset_message()

    assert [s for s in STAGE_ORDER if table.stage(s)] == ["C", "H"]
    assert table.stage("U") == {"u": "unknown"}
    assert dict(table) == {"at_C": "c", "at_H": "h", "u": "unknown"}


def test_macro_table_clear() -> None:
    table = full_table()

    table.clear()

    assert len(table) == 0
    assert dict(table) == {}
    assert all(not table.stage(s) for s in STAGE_ORDER)


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
