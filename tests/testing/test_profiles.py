"""MTA profiles: offers, default macros per stage and their values, header events (§2, §3, §8)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from milterapp.constants import ActionFlag, MacroStage, ProtocolFlag
from milterapp.events import Header
from milterapp.testing.profiles import (
    POSTFIX,
    PROFILES,
    SENDMAIL,
    MtaProfile,
    SessionFacts,
    profile,
)

FACTS = SessionFacts(
    queue_id="4QZ1bX0abcz9sWX",
    sender="alice@test.example",
    recipient="bob@example.org",
    accepted_recipients=1,
)


def test_profile_by_name_and_passthrough() -> None:
    assert profile("postfix") is POSTFIX
    assert profile("sendmail") is SENDMAIL
    custom = POSTFIX.model_copy(update={"name": "postfix-custom"})
    assert profile(custom) is custom
    assert PROFILES == {"postfix": POSTFIX, "sendmail": SENDMAIL}


def test_profile_unknown_name_raises() -> None:
    with pytest.raises(ValueError, match="unknown MTA 'exim'"):
        profile("exim")  # type: ignore[arg-type]


@pytest.mark.parametrize("mta", [POSTFIX, SENDMAIL], ids=["postfix", "sendmail"])
def test_profile_offer_is_version_6_with_everything(mta: MtaProfile) -> None:
    assert mta.offer.version == 6
    assert mta.offer.actions == ActionFlag.ALL
    assert int(mta.offer.actions) == 0x1FF
    assert mta.offer.protocol == ProtocolFlag.ALL
    assert int(mta.offer.protocol) == 0x1FFFFF
    assert mta.body_chunk_size == 65535


def test_profile_behaviour_flags_differ_as_documented() -> None:
    assert POSTFIX.sends_macros_without_values
    assert not SENDMAIL.sends_macros_without_values
    assert POSTFIX.abort_after_each_message
    assert not SENDMAIL.abort_after_each_message
    assert POSTFIX.queue_id_from_rcpt
    assert not SENDMAIL.queue_id_from_rcpt
    assert POSTFIX.deletes_headers
    assert not SENDMAIL.deletes_headers
    assert POSTFIX.macro_stage_letters == "CHMRTLNBEU"
    assert SENDMAIL.macro_stage_letters == "CHMRTNE"


def test_profile_is_frozen() -> None:
    with pytest.raises(ValueError, match="frozen"):
        POSTFIX.name = "other"  # type: ignore[misc]


def test_profile_default_macro_lists_match_the_reference() -> None:
    assert POSTFIX.macros["C"] == ("j", "{daemon_name}", "{daemon_addr}", "v", "_")
    assert POSTFIX.macros["H"] == (
        "{tls_version}",
        "{cipher}",
        "{cipher_bits}",
        "{cert_subject}",
        "{cert_issuer}",
    )
    assert POSTFIX.macros["M"] == (
        "i",
        "{auth_type}",
        "{auth_authen}",
        "{auth_author}",
        "{mail_addr}",
        "{mail_host}",
        "{mail_mailer}",
    )
    assert POSTFIX.macros["R"] == ("i", "{rcpt_addr}", "{rcpt_host}", "{rcpt_mailer}")
    assert all(POSTFIX.macros[letter] == ("i",) for letter in "TNE")
    assert SENDMAIL.macros["C"] == ("j", "_", "{daemon_name}", "{if_name}", "{if_addr}")
    assert SENDMAIL.macros["M"][0] == "i"
    assert "{auth_ssf}" in SENDMAIL.macros["M"]
    assert SENDMAIL.macros["R"] == ("{rcpt_mailer}", "{rcpt_host}", "{rcpt_addr}")
    assert SENDMAIL.macros["E"] == ("{msg_id}",)
    assert not SENDMAIL.macros.get("T")
    assert not SENDMAIL.macros.get("N")


def test_profile_sends_macro_packet_postfix_always_sendmail_only_with_a_list() -> None:
    assert all(POSTFIX.sends_macro_packet(letter) for letter in "CHMRTLNBEU")
    assert [letter for letter in "CHMRTLNBEU" if SENDMAIL.sends_macro_packet(letter)] == list(
        "CHMRE"
    )


def test_profile_postfix_connect_macros() -> None:
    assert POSTFIX.macro_values("C", FACTS) == {
        "j": "mx.example.net",
        "{daemon_name}": "smtpd",
        "{daemon_addr}": "198.51.100.25",
        "v": "Postfix 3.7.11",
        "_": "client.example [192.0.2.10]",
    }


def test_profile_sendmail_connect_macros() -> None:
    assert SENDMAIL.macro_values("C", FACTS) == {
        "j": "mx.example.net",
        "_": "client.example [192.0.2.10]",
        "{daemon_name}": "MTA",
        "{if_name}": "mx.example.net",
        "{if_addr}": "198.51.100.25",
    }


def test_profile_sendmail_connect_on_loopback_has_no_if_addr() -> None:
    facts = SessionFacts(daemon_addr="127.0.0.1")
    values = SENDMAIL.macro_values("C", facts)
    assert "{if_addr}" not in values
    assert values["{if_name}"] == "localhost"


def test_profile_client_macro_for_unknown_name_and_ipv6() -> None:
    unknown = SessionFacts(client_name="[192.0.2.10]")
    assert POSTFIX.macro_values("C", unknown)["_"] == "unknown [192.0.2.10]"
    assert SENDMAIL.macro_values("C", unknown)["_"] == "[192.0.2.10]"
    v6 = SessionFacts(client_address="2001:db8::10", client_name="client.example")
    assert POSTFIX.macro_values("C", v6)["_"] == "client.example [2001:db8::10]"
    assert SENDMAIL.macro_values("C", v6)["_"] == "client.example [IPv6:2001:db8::10]"


def test_profile_daemon_name_from_facts_overrides_the_default() -> None:
    facts = SessionFacts(daemon_name="submission")
    assert POSTFIX.macro_values("C", facts)["{daemon_name}"] == "submission"


def test_profile_helo_macros_absent_without_tls() -> None:
    assert POSTFIX.macro_values("H", FACTS) == {}
    assert SENDMAIL.macro_values("H", FACTS) == {}


def test_profile_postfix_mail_macros_have_no_queue_id() -> None:
    values = POSTFIX.macro_values("M", FACTS)  # even with a queue ID known from before
    assert "i" not in values
    assert values == {
        "{mail_addr}": "alice@test.example",
        "{mail_host}": "test.example",
        "{mail_mailer}": "smtp",
    }


def test_profile_sendmail_mail_macros_have_the_queue_id() -> None:
    assert SENDMAIL.macro_values("M", FACTS) == {
        "i": "4QZ1bX0abcz9sWX",
        "{mail_mailer}": "esmtp",
        "{mail_host}": "test.example",
        "{mail_addr}": "alice@test.example",
    }


def test_profile_postfix_queue_id_only_after_first_accepted_rcpt() -> None:
    first = FACTS.model_copy(update={"accepted_recipients": 0})
    assert "i" not in POSTFIX.macro_values("R", first)
    assert POSTFIX.macro_values("R", FACTS)["i"] == "4QZ1bX0abcz9sWX"
    for letter in "TLNBE":
        assert POSTFIX.macro_values(letter, FACTS) == {"i": "4QZ1bX0abcz9sWX"}


def test_profile_rcpt_macros() -> None:
    assert POSTFIX.macro_values("R", FACTS) == {
        "i": "4QZ1bX0abcz9sWX",
        "{rcpt_addr}": "bob@example.org",
        "{rcpt_host}": "example.org",
        "{rcpt_mailer}": "virtual",
    }
    assert SENDMAIL.macro_values("R", FACTS) == {
        "{rcpt_mailer}": "esmtp",
        "{rcpt_host}": "example.org",
        "{rcpt_addr}": "bob@example.org",
    }


def test_profile_auth_macros_only_when_authenticated() -> None:
    authed = FACTS.model_copy(update={"auth_type": "PLAIN", "auth_authen": "alice"})
    for mta in (POSTFIX, SENDMAIL):
        values = mta.macro_values("M", authed)
        assert values["{auth_type}"] == "PLAIN"
        assert values["{auth_authen}"] == "alice"
        assert "{auth_author}" not in values
        assert "{auth_type}" not in mta.macro_values("M", FACTS)


def test_profile_null_sender_has_empty_mail_addr() -> None:
    values = POSTFIX.macro_values("M", FACTS.model_copy(update={"sender": ""}))
    assert values == {"{mail_addr}": ""}


def test_profile_sendmail_eom_msg_id() -> None:
    assert SENDMAIL.macro_values("E", FACTS) == {}
    with_id = FACTS.model_copy(update={"message_id": "<1@client.example>"})
    assert SENDMAIL.macro_values("E", with_id) == {"{msg_id}": "<1@client.example>"}
    assert SENDMAIL.macro_values("T", with_id) == {}


def test_profile_no_macros_before_the_values_exist() -> None:
    empty = SessionFacts()
    assert POSTFIX.macro_values("M", empty) == {}
    assert POSTFIX.macro_values("R", empty) == {}
    assert SENDMAIL.macro_values("M", empty) == {}


def test_profile_extra_adds_and_overrides() -> None:
    facts = FACTS.model_copy(
        update={"extra": {"C": {"j": "other.example", "{client_ptr}": "x"}, "M": {"i": "Q1"}}}
    )
    connect = POSTFIX.macro_values("C", facts)
    assert connect["j"] == "other.example"
    assert connect["{client_ptr}"] == "x"
    assert POSTFIX.macro_values("M", facts)["i"] == "Q1"


def test_profile_extra_override_matches_names_with_or_without_braces() -> None:
    facts = FACTS.model_copy(update={"extra": {"M": {"mail_addr": "x@y"}}})
    values = SENDMAIL.macro_values("M", facts)
    assert values["mail_addr"] == "x@y"
    assert "{mail_addr}" not in values


def test_profile_macro_values_with_requested_names() -> None:
    names = ["{client_addr}", "{client_name}", "{client_port}", "{unknown_macro}"]
    assert POSTFIX.macro_values("M", FACTS, names) == {
        "{client_addr}": "192.0.2.10",
        "{client_name}": "client.example",
        "{client_port}": "49974",
    }


def test_profile_with_requested_macros_replaces_lists() -> None:
    requested = {MacroStage.ENVFROM: ["{auth_authen}", "i"], MacroStage.EOH: ["j"]}
    postfix = POSTFIX.with_requested_macros(requested)
    assert postfix.macros["M"] == ("{auth_authen}", "i")
    assert postfix.macros["N"] == postfix.macros["L"] == ("j",)
    assert POSTFIX.macros["M"][0] == "i"  # the original is untouched
    sendmail = SENDMAIL.with_requested_macros(requested)
    assert sendmail.macros["N"] == ("j",)
    assert "L" not in sendmail.macros


def test_profile_with_requested_empty_list() -> None:
    requested = {MacroStage.CONNECT: ()}
    assert SENDMAIL.with_requested_macros(requested).macros["C"] == ()
    assert not SENDMAIL.with_requested_macros(requested).sends_macro_packet("C")
    assert POSTFIX.with_requested_macros(requested).macros["C"] == POSTFIX.macros["C"]


@pytest.mark.parametrize("stage", ["", "X", "CH", "c"])
def test_profile_macro_values_rejects_unknown_stage(stage: str) -> None:
    with pytest.raises(ValueError, match="stage must be one of"):
        POSTFIX.macro_values(stage, FACTS)


@pytest.mark.parametrize("mta", [POSTFIX, SENDMAIL], ids=["postfix", "sendmail"])
def test_profile_header_for_milter_removes_one_leading_space(mta: MtaProfile) -> None:
    assert mta.header_for_milter("Subject", " hello") == Header(name="Subject", value="hello")
    assert mta.header_for_milter("Subject", "  two").value == " two"
    assert mta.header_for_milter("Subject", "\ttab").value == "\ttab"
    assert mta.header_for_milter("Subject", "none").value == "none"
    assert mta.header_for_milter("X-Empty", "").value == ""


def test_profile_header_for_milter_with_leading_space_keeps_it() -> None:
    header = POSTFIX.header_for_milter("Subject", " hello", leading_space=True)
    assert header == Header(name="Subject", value=" hello", leading_space=True)


def test_profile_header_for_milter_folded_value_has_bare_lf() -> None:
    header = SENDMAIL.header_for_milter("Received", " from a\r\n\tby b\r\n")
    assert header.value == "from a\n\tby b"
    assert "\r" not in header.value


@given(st.text(alphabet=" \tab\n", max_size=20))
def test_profile_header_for_milter_strips_at_most_one_space(value: str) -> None:
    sent = POSTFIX.header_for_milter("X", value).value
    raw = value.removesuffix("\n")
    assert sent in (raw, raw[1:])
    assert sent == (raw[1:] if raw.startswith(" ") else raw)
