"""examples/blocklists.py: listed senders refused at MAIL, listed recipients at RCPT."""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

import pytest

from milterapp import Continue, Reject
from milterapp.testing import MilterTestClient

MESSAGE = b"Subject: hello\r\n\r\nHello.\r\n"
SENDER_REFUSED = Reject(code=550, xcode="5.7.1", text="sender refused by policy")
RECIPIENT_REFUSED = Reject(code=550, xcode="5.1.1", text="no such recipient here")


@pytest.fixture
def blocklists(load_example: Callable[[str], ModuleType]) -> ModuleType:
    return load_example("blocklists")


@pytest.mark.parametrize(
    "sender",
    [
        "spammer@bad.example",  # a listed address
        "Spammer@BAD.Example",  # the same address, any case
        "anyone@spam.example",  # any address in a listed domain
        "Someone@JUNK.example",  # a listed domain, any case
    ],
)
def test_blocklists_refuses_listed_senders_at_mail(blocklists: ModuleType, sender: str) -> None:
    with MilterTestClient(blocklists.app) as client:
        result = client.send_message(MESSAGE, sender=sender)
    assert result.rejected
    assert result.stage == "envfrom"
    assert result.verdict == SENDER_REFUSED
    assert result.recipients == {}  # refused before any RCPT
    assert result.delivered is None


@pytest.mark.parametrize(
    "sender",
    [
        "friend@bad.example",  # only one address of bad.example is listed, not the domain
        "spammer@good.example",
        "someone@sub.spam.example",  # a listed domain does not cover its subdomains
    ],
)
def test_blocklists_lets_other_senders_through(blocklists: ModuleType, sender: str) -> None:
    with MilterTestClient(blocklists.app) as client:
        result = client.send_message(MESSAGE, sender=sender)
    assert result.accepted
    assert result.delivered is not None
    assert result.delivered.sender == sender


def test_blocklists_refuses_one_listed_recipient_and_delivers_to_the_others(
    blocklists: ModuleType,
) -> None:
    recipients = ["alice@example.org", "NoReply@Example.ORG", "bob@example.org"]
    with MilterTestClient(blocklists.app) as client:
        result = client.send_message(MESSAGE, recipients=recipients)
    assert result.accepted
    assert result.recipients == {
        "alice@example.org": Continue(),
        "NoReply@Example.ORG": RECIPIENT_REFUSED,
        "bob@example.org": Continue(),
    }
    assert result.delivered is not None
    assert result.delivered.recipients == ("alice@example.org", "bob@example.org")
    assert result.delivered.body == b"Hello.\r\n"


def test_blocklists_refuses_the_message_when_every_recipient_is_listed(
    blocklists: ModuleType,
) -> None:
    recipients = ["noreply@example.org", "former-employee@example.org"]
    with MilterTestClient(blocklists.app, mta="sendmail") as client:
        result = client.send_message(MESSAGE, recipients=recipients)
        after = client.send_message(MESSAGE, recipients=["alice@example.org"])
    assert result.rejected
    assert result.stage == "envrcpt"
    assert result.verdict == RECIPIENT_REFUSED
    assert result.recipients == dict.fromkeys(recipients, RECIPIENT_REFUSED)
    assert result.delivered is None
    # The next message on the same connection is not affected.
    assert after.accepted
    assert after.delivered is not None
    assert after.delivered.recipients == ("alice@example.org",)
