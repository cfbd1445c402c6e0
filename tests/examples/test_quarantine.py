"""examples/quarantine.py: a forged From: asking for a password goes to the quarantine."""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Literal

import pytest

from milterapp import Quarantine
from milterapp.testing import MilterTestClient

REASON = "forged sender asking for a password"


@pytest.fixture
def quarantine(load_example: Callable[[str], ModuleType]) -> ModuleType:
    return load_example("quarantine")


def message(from_header: str, body: str) -> bytes:
    return (
        f"From: {from_header}\r\nTo: alice@example.org\r\nSubject: account\r\n\r\n{body}\r\n"
    ).encode()


@pytest.mark.parametrize("mta", ["postfix", "sendmail"])
def test_quarantine_holds_a_forged_from_asking_for_a_password(
    quarantine: ModuleType, mta: Literal["postfix", "sendmail"]
) -> None:
    forged = message('"IT Support" <support@example.org>', "Please confirm your PASSWORD here.")
    with MilterTestClient(quarantine.app, mta=mta) as client:
        result = client.send_message(forged, sender="bounce@phish.example")
    assert result.accepted  # the MTA takes the message, but holds it
    assert result.quarantined == REASON
    assert result.modifications == [Quarantine(reason=REASON)]
    assert result.delivered is not None
    assert result.delivered.quarantine == REASON


def test_quarantine_delivers_a_normal_message(quarantine: ModuleType) -> None:
    # Asks for a password, but From: matches the envelope sender's domain.
    normal = message("Bob <bob@partner.example>", "Your new password is in the letter.")
    with MilterTestClient(quarantine.app) as client:
        result = client.send_message(normal, sender="bob@partner.example")
    assert result.accepted
    assert result.quarantined is None
    assert result.modifications == []


def test_quarantine_needs_both_signs(quarantine: ModuleType) -> None:
    forged_only = message("support@example.org", "Nothing to see here.")
    with MilterTestClient(quarantine.app) as client:
        first = client.send_message(forged_only, sender="bounce@phish.example")
        # The score does not carry over from the previous message of the connection.
        password_only = message("bounce@phish.example", "password reminder")
        second = client.send_message(password_only, sender="bounce@phish.example")
    assert first.quarantined is None
    assert second.quarantined is None
