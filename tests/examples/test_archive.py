"""examples/archive.py: every accepted message also goes to the archive, with NOTIFY=NEVER."""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Literal

import pytest

from milterapp import AddRecipient
from milterapp.testing import MilterTestClient

MESSAGE = b"From: alice@example.org\r\nTo: bob@example.net\r\nSubject: hi\r\n\r\nHello.\r\n"


@pytest.fixture
def archive(load_example: Callable[[str], ModuleType]) -> ModuleType:
    return load_example("archive")


@pytest.mark.parametrize("mta", ["postfix", "sendmail"])
def test_archive_adds_the_archive_recipient_with_notify_never(
    archive: ModuleType, mta: Literal["postfix", "sendmail"]
) -> None:
    with MilterTestClient(archive.app, mta=mta) as client:
        result = client.send_message(MESSAGE, recipients=["bob@example.net", "carol@example.net"])
    assert result.accepted
    assert result.modifications == [
        AddRecipient(address="<archive@example.org>", args="NOTIFY=NEVER")
    ]
    assert result.delivered is not None
    assert result.delivered.recipients == (
        "bob@example.net",
        "carol@example.net",
        "archive@example.org",
    )
    assert result.delivered.body == b"Hello.\r\n"


def test_archive_keeps_one_copy_when_the_archive_is_already_a_recipient(
    archive: ModuleType,
) -> None:
    with MilterTestClient(archive.app) as client:
        result = client.send_message(MESSAGE, recipients=["archive@EXAMPLE.org"])
    assert result.delivered is not None
    assert result.delivered.recipients == ("archive@EXAMPLE.org",)


def test_archive_adds_the_recipient_to_each_message_of_a_connection(archive: ModuleType) -> None:
    with MilterTestClient(archive.app) as client:
        first = client.send_message(MESSAGE, recipients=["bob@example.net"])
        second = client.send_message(MESSAGE, recipients=["dave@example.net"])
    assert first.delivered is not None
    assert second.delivered is not None
    assert first.delivered.recipients == ("bob@example.net", "archive@example.org")
    assert second.delivered.recipients == ("dave@example.net", "archive@example.org")
