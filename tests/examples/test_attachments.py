"""examples/attachments.py: oversized messages and executable attachments are refused."""

from __future__ import annotations

from collections.abc import Callable
from email.message import EmailMessage
from types import ModuleType

import pytest

from milterapp import Continue, Reject
from milterapp.testing import MilterTestClient

TOO_BIG = Reject(code=552, xcode="5.3.4", text="message too big for this system")


@pytest.fixture
def attachments(load_example: Callable[[str], ModuleType]) -> ModuleType:
    return load_example("attachments")


def message_with(filename: str, maintype: str, subtype: str, data: bytes) -> EmailMessage:
    message = EmailMessage()
    message["From"] = "alice@example.org"
    message["To"] = "bob@example.net"
    message["Subject"] = "the file"
    message.set_content("Here it is.\n")
    message.add_attachment(data, maintype=maintype, subtype=subtype, filename=filename)
    return message


def test_attachments_refuses_an_announced_size_above_the_limit_at_mail(
    attachments: ModuleType,
) -> None:
    with MilterTestClient(attachments.app) as client:
        result = client.send_message(b"Subject: big\r\n\r\nx\r\n", mail_args=["SIZE=20000000"])
    assert result.rejected
    assert result.stage == "envfrom"
    assert result.verdict == TOO_BIG
    assert result.delivered is None


def test_attachments_accepts_an_announced_size_within_the_limit(attachments: ModuleType) -> None:
    with MilterTestClient(attachments.app) as client:
        result = client.send_message(
            b"Subject: small\r\n\r\nx\r\n", mail_args=["SIZE=2000", "BODY=8BITMIME"]
        )
    assert result.accepted
    envfrom = result.reply("envfrom")
    assert envfrom is not None
    assert envfrom.verdict == Continue()


@pytest.mark.parametrize("filename", ["setup.exe", "Invoice.PDF.EXE", "run.ps1"])
def test_attachments_refuses_an_executable_attachment(
    attachments: ModuleType, filename: str
) -> None:
    message = message_with(filename, "application", "octet-stream", b"MZ\x90\x00" * 64)
    with MilterTestClient(attachments.app) as client:
        result = client.send_message(message)
    assert result.rejected
    assert result.stage == "eom"
    assert result.verdict == Reject(
        code=550, xcode="5.7.1", text=f"executable attachment {filename.lower()} refused"
    )
    assert result.delivered is None


def test_attachments_accepts_a_pdf_attachment(attachments: ModuleType) -> None:
    message = message_with("report.pdf", "application", "pdf", b"%PDF-1.7\n" + bytes(range(256)))
    with MilterTestClient(attachments.app) as client:
        result = client.send_message(message)
    assert result.accepted
    assert result.modifications == []
    assert result.delivered is not None
    [attachment] = result.delivered.as_email().iter_attachments()
    assert attachment.get_filename() == "report.pdf"
    assert attachment.get_content() == b"%PDF-1.7\n" + bytes(range(256))


def test_attachments_refuses_a_body_above_the_limit(
    attachments: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(attachments, "MAX_SIZE", 1000)
    small = b"Subject: small\r\n\r\n" + b"x" * 78 + b"\r\n"
    big = b"Subject: big\r\n\r\n" + (b"x" * 78 + b"\r\n") * 20  # 1600 bytes of body
    with MilterTestClient(attachments.app) as client:
        accepted = client.send_message(small)
        refused = client.send_message(big)  # no SIZE= given: found on the data itself
    assert accepted.accepted
    assert refused.rejected
    assert refused.stage == "eom"
    assert refused.verdict == TOO_BIG
