"""examples/redact.py: card numbers in the body are replaced and counted in X-Redacted."""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

import pytest

from milterapp import AddHeader, ReplaceBody
from milterapp.testing import MilterTestClient

HEADERS = b"From: alice@example.org\r\nTo: shop@example.net\r\nSubject: order\r\n\r\n"


@pytest.fixture
def redact(load_example: Callable[[str], ModuleType]) -> ModuleType:
    return load_example("redact")


def test_redact_replaces_card_numbers_and_counts_them(redact: ModuleType) -> None:
    body = (
        b"Please charge 4111 1111 1111 1111 for the order.\r\n"
        b"Or the other one: 5500-0000-0000-0004.\r\n"
        b"Or 378282246310005, thanks.\r\n"
    )
    with MilterTestClient(redact.app) as client:
        result = client.send_message(HEADERS + body)
    assert result.accepted
    expected = (
        b"Please charge [number removed] for the order.\r\n"
        b"Or the other one: [number removed].\r\n"
        b"Or [number removed], thanks.\r\n"
    )
    assert result.modifications == [
        ReplaceBody(chunk=expected),
        AddHeader(name="X-Redacted", value="3 card number(s)"),
    ]
    assert result.delivered is not None
    assert result.delivered.body == expected
    assert result.delivered.header("X-Redacted") == "3 card number(s)"
    assert result.delivered.header("Subject") == "order"


def test_redact_leaves_clean_mail_untouched(redact: ModuleType) -> None:
    # Numbers that are not card numbers: too short, or a phone number, a date.
    body = b"Order 12345, call 555-1234 or +1 212 555 0100 before 2024-01-31.\r\n"
    with MilterTestClient(redact.app) as client:
        result = client.send_message(HEADERS + body)
    assert result.accepted
    assert result.modifications == []
    assert result.delivered is not None
    assert result.delivered.body == body
    assert result.delivered.header("X-Redacted") is None


def test_redact_finds_a_card_number_split_across_body_chunks(redact: ModuleType) -> None:
    # Postfix sends the body in chunks of 65535 bytes; the example reads the whole kept body.
    filler = b"x" * 76 + b"\r\n"
    padding = filler * (65535 // len(filler)) + b"y" * (65535 % len(filler) - 9) + b" "
    body = padding + b"4111 1111 1111 1111\r\n"  # the number straddles the chunk boundary
    with MilterTestClient(redact.app) as client:
        result = client.send_message(HEADERS + body)
    assert result.delivered is not None
    assert result.delivered.header("X-Redacted") == "1 card number(s)"
    assert result.delivered.body == padding + b"[number removed]\r\n"
