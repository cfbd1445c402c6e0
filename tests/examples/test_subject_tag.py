"""examples/subject_tag.py: the Subject of mail from outside example.org is tagged."""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

import pytest

from milterapp import AddHeader, ChangeHeader
from milterapp.testing import MilterTestClient


@pytest.fixture
def subject_tag(load_example: Callable[[str], ModuleType]) -> ModuleType:
    return load_example("subject_tag")


def message(subject: str | None) -> bytes:
    head = b"From: someone@partner.example\r\nTo: alice@example.org\r\n"
    if subject is not None:
        head += b"Subject: " + subject.encode() + b"\r\n"
    return head + b"\r\nHello.\r\n"


def test_subject_tag_tags_external_mail(subject_tag: ModuleType) -> None:
    with MilterTestClient(subject_tag.app) as client:
        result = client.send_message(message("Invoice"), sender="someone@partner.example")
    assert result.accepted
    assert result.modifications == [
        ChangeHeader(name="Subject", value="[EXTERNAL] Invoice", index=1)
    ]
    assert result.delivered is not None
    assert result.delivered.headers_named("Subject") == ["[EXTERNAL] Invoice"]


@pytest.mark.parametrize("sender", ["bob@example.org", "Bob@EXAMPLE.ORG"])
def test_subject_tag_leaves_internal_mail_alone(subject_tag: ModuleType, sender: str) -> None:
    with MilterTestClient(subject_tag.app) as client:
        result = client.send_message(message("Lunch"), sender=sender)
    assert result.accepted
    assert result.modifications == []
    assert result.delivered is not None
    assert result.delivered.header("Subject") == "Lunch"


def test_subject_tag_does_not_tag_twice(subject_tag: ModuleType) -> None:
    with MilterTestClient(subject_tag.app) as client:
        result = client.send_message(
            message("[EXTERNAL] Re: Invoice"), sender="someone@partner.example"
        )
    assert result.modifications == []
    assert result.delivered is not None
    assert result.delivered.headers_named("Subject") == ["[EXTERNAL] Re: Invoice"]


def test_subject_tag_adds_a_subject_when_missing(subject_tag: ModuleType) -> None:
    with MilterTestClient(subject_tag.app) as client:
        result = client.send_message(message(None), sender="someone@partner.example")
    assert result.modifications == [AddHeader(name="Subject", value="[EXTERNAL]")]
    assert result.delivered is not None
    assert result.delivered.headers_named("Subject") == ["[EXTERNAL]"]


def test_subject_tag_decides_per_message_on_one_connection(subject_tag: ModuleType) -> None:
    with MilterTestClient(subject_tag.app, mta="sendmail") as client:
        external = client.send_message(message("One"), sender="someone@partner.example")
        internal = client.send_message(message("Two"), sender="bob@example.org")
        no_subject = client.send_message(message(None), sender="bob@example.org")
    assert external.delivered is not None
    assert internal.delivered is not None
    assert no_subject.delivered is not None
    assert external.delivered.header("Subject") == "[EXTERNAL] One"
    assert internal.delivered.header("Subject") == "Two"
    assert no_subject.delivered.header("Subject") is None  # internal: no Subject added
