"""The verdict table of docs/chaining.md, row by row: how the parties' answers combine."""

from __future__ import annotations

from collections.abc import Mapping

import pytest

from milterapp.chain.referee import Referee
from milterapp.replies import (
    Accept,
    Continue,
    Discard,
    Reject,
    Shutdown,
    Skip,
    TempFail,
    Verdict,
)

Answer = Verdict | Shutdown | None


def ask(
    referee: Referee, stage: str, answers: Mapping[int, Answer]
) -> tuple[Verdict | Shutdown, list[int]]:
    """Ask the parties in order as the chain does; return the MTA's reply and who was asked
    (parties not in ``answers`` say Continue)."""
    asked = []
    for party in referee.asks(stage):
        asked.append(party)
        if referee.hears(stage, party, answers.get(party, Continue())):
            break
    return referee.reply(stage), asked


REFUSALS = [Reject(), TempFail(), Reject(code=550, xcode="5.7.1", text="no"), Shutdown()]


@pytest.mark.parametrize("verdict", REFUSALS, ids=repr)
@pytest.mark.parametrize("stage", ["connect", "helo", "envfrom", "data", "header", "eom"])
def test_a_refusal_answers_at_once_and_later_parties_are_not_asked(
    stage: str, verdict: Verdict
) -> None:
    referee = Referee(["own", "dkim", "spam"])
    reply, asked = ask(referee, stage, {1: verdict})
    assert reply is verdict
    assert asked == [0, 1]


@pytest.mark.parametrize("verdict", [Reject(), TempFail()], ids=repr)
def test_a_refused_recipient_is_that_recipient_only(verdict: Verdict) -> None:
    referee = Referee(["own", "dkim"])
    ask(referee, "envfrom", {1: Accept()})  # dkim is done with this message
    reply, asked = ask(referee, "envrcpt", {0: verdict})
    assert reply is verdict
    reply, asked = ask(referee, "envrcpt", {})  # the next recipient: the message goes on
    assert (reply, asked) == (Continue(), [0])  # and dkim is still done with it


def test_a_refusal_from_mail_on_ends_the_message_for_everyone() -> None:
    referee = Referee(["own", "dkim"])
    ask(referee, "envfrom", {1: Accept()})
    ask(referee, "header", {0: Reject()})
    assert ask(referee, "envfrom", {}) == (Continue(), [0, 1])  # a new message: both again


def test_discard_ends_the_message_even_at_a_recipient() -> None:
    referee = Referee(["own", "dkim"])
    ask(referee, "envfrom", {1: Accept()})
    reply, _ = ask(referee, "envrcpt", {0: Discard()})
    assert reply == Discard()
    assert ask(referee, "envfrom", {})[1] == [0, 1]


def test_accept_from_one_party_is_that_party_done_and_the_mta_told_continue() -> None:
    referee = Referee(["own", "dkim"])
    assert ask(referee, "envfrom", {0: Accept()}) == (Continue(), [0, 1])
    assert ask(referee, "envrcpt", {}) == (Continue(), [1])
    assert ask(referee, "eom", {}) == (Continue(), [1])
    assert ask(referee, "envfrom", {}) == (Continue(), [0, 1])  # the next message: both


def test_accept_from_every_party_is_accept() -> None:
    referee = Referee(["own", "dkim"])
    assert ask(referee, "envfrom", {0: Accept()}) == (Continue(), [0, 1])
    assert ask(referee, "envrcpt", {1: Accept()}) == (Accept(), [1])
    assert ask(referee, "envfrom", {}) == (Continue(), [0, 1])  # the message was accepted


def test_accept_at_connect_or_helo_is_for_the_whole_connection() -> None:
    referee = Referee(["own", "dkim"])
    assert ask(referee, "helo", {1: Accept()}) == (Continue(), [0, 1])
    for _ in range(2):  # message after message
        assert ask(referee, "envfrom", {})[1] == [0]
        assert ask(referee, "eom", {})[1] == [0]
    assert ask(referee, "envfrom", {0: Accept()}) == (Accept(), [0])


def test_skip_stops_the_body_for_that_party_and_is_passed_on_only_when_all_skip() -> None:
    referee = Referee(["own", "dkim"])
    assert ask(referee, "body", {0: Skip()}) == (Continue(), [0, 1])
    assert ask(referee, "body", {}) == (Continue(), [1])
    assert ask(referee, "body", {1: Skip()}) == (Skip(), [1])
    assert ask(referee, "eom", {}) == (Continue(), [0, 1])  # both get end of message
    assert ask(referee, "body", {})[1] == [0, 1]  # the next message's body: both again


def test_skip_outside_the_body_is_continue() -> None:
    referee = Referee(["own"])
    assert ask(referee, "header", {0: Skip()}) == (Continue(), [0])


def test_an_abort_makes_every_party_count_again() -> None:
    referee = Referee(["own", "dkim"])
    ask(referee, "envfrom", {0: Accept()})
    ask(referee, "body", {1: Skip()})
    referee.message_aborted()
    assert ask(referee, "envfrom", {})[1] == [0, 1]
    assert ask(referee, "body", {})[1] == [0, 1]


def test_a_chain_needs_a_party() -> None:
    with pytest.raises(ValueError, match="at least one party"):
        Referee([])


def test_every_row_of_the_documented_verdict_table_names_tests_that_exist() -> None:
    """docs/chaining.md's verdict table gives each row's tests: each must exist here."""
    import re
    from pathlib import Path

    here = Path(__file__).parent
    page = (here.parent.parent / "docs" / "chaining.md").read_text()
    table = page.split("## The verdict table", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    defined = set(
        re.findall(
            r"^def (test_\w+)",
            "".join(path.read_text() for path in here.glob("test_*.py")),
            re.MULTILINE,
        )
    )
    named = [re.findall(r"`(test_\w+)`", row) for row in rows[1:]]  # (not the header)
    assert len(named) >= 10
    assert all(named), "a row without a test"
    missing = {name for names in named for name in names} - defined
    assert not missing
