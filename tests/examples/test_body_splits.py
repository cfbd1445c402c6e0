"""Every example that reads the body answers alike wherever the MTA cuts the body: each one's
trigger message is sent whole, then in chunks of every size from one byte up, so that a chunk
boundary falls at every place in the body (MTAs cut it where their buffers end)."""

from __future__ import annotations

from collections.abc import Callable
from email.message import EmailMessage
from types import ModuleType
from typing import Any, NamedTuple

import pytest

from milterapp import Reject
from milterapp.testing import MessageResult, MilterTestClient
from milterapp.testing.delivery import parse_message


class Trigger(NamedTuple):
    message: bytes
    options: dict[str, Any]
    fired: Callable[[MessageResult], bool]


def _attachment() -> bytes:
    message = EmailMessage()
    message["From"] = "alice@example.org"
    message["Subject"] = "the file"
    message.set_content("Here it is.\n")
    message.add_attachment(
        b"MZ\x90\x00" * 8, maintype="application", subtype="octet-stream", filename="run.exe"
    )
    return message.as_bytes()


TRIGGERS = {
    "quarantine": Trigger(
        b'From: "IT Support" <support@example.org>\r\nSubject: account\r\n\r\n'
        b"Please confirm your PASSWORD here.\r\n",
        {"sender": "bounce@phish.example"},
        lambda result: result.quarantined is not None,
    ),
    "redact": Trigger(
        b"Subject: order\r\n\r\nPlease charge 4111 1111 1111 1111 for the order.\r\n",
        {},
        lambda result: (
            result.delivered is not None
            and result.delivered.header("X-Redacted") == "1 card number(s)"
        ),
    ),
    "attachments": Trigger(
        _attachment(),
        {},
        lambda result: isinstance(result.verdict, Reject) and result.stage == "eom",
    ),
    "slow_check": Trigger(  # (half a second per message: a short body)
        b"Subject: scan me\r\n\r\nEICAR",
        {},
        lambda result: isinstance(result.verdict, Reject),
    ),
}


@pytest.mark.parametrize("name", sorted(TRIGGERS))
def test_an_example_answers_alike_wherever_the_body_is_cut(
    name: str, load_example: Callable[[str], ModuleType]
) -> None:
    example = load_example(name)
    trigger = TRIGGERS[name]
    _, body = parse_message(trigger.message)
    with MilterTestClient(example.app) as client:
        whole = client.send_message(trigger.message, **trigger.options)
        assert trigger.fired(whole), whole
        for size in range(1, len(body)):
            cut = client.send_message(trigger.message, body_chunk_size=size, **trigger.options)
            assert (cut.verdict, cut.stage, cut.modifications) == (
                whole.verdict,
                whole.stage,
                whole.modifications,
            ), f"{name}: the body in chunks of {size} bytes"
