"""examples/slow_check.py: a slow external scan at end of message, with automatic progress."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from types import ModuleType

import pytest

from milterapp import AddHeader, Reject
from milterapp.testing import MilterTestClient

HEADERS = b"From: alice@example.org\r\nTo: bob@example.net\r\nSubject: scan me\r\n\r\n"


@pytest.fixture
def slow_check(load_example: Callable[[str], ModuleType]) -> ModuleType:
    return load_example("slow_check")


def test_slow_check_stamps_clean_mail_and_refuses_eicar(slow_check: ModuleType) -> None:
    # The example's own stand-in scanner (half a second per message).
    with MilterTestClient(slow_check.app) as client:
        clean = client.send_message(HEADERS + b"Nothing to see.\r\n")
        infected = client.send_message(HEADERS + b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$EICAR\r\n")
    assert clean.accepted
    assert clean.modifications == [AddHeader(name="X-Scanned", value="clean")]
    assert clean.delivered is not None
    assert clean.delivered.header("X-Scanned") == "clean"
    assert infected.rejected
    assert infected.stage == "eom"
    assert infected.verdict == Reject(
        code=550, xcode="5.7.1", text="message refused by the content scanner"
    )
    assert infected.modifications == []


def test_slow_check_sends_progress_while_the_scan_runs(
    slow_check: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    scanned: list[bytes] = []

    async def slow_scanner(body: bytes) -> bool:
        scanned.append(body)
        await asyncio.sleep(0.3)  # the simulated slow service, not synchronisation
        return True

    monkeypatch.setattr(slow_check, "external_verdict", slow_scanner)
    app = slow_check.app
    monkeypatch.setattr(app, "config", app.config.model_copy(update={"progress_interval": 0.05}))
    with MilterTestClient(app) as client:
        result = client.send_message(HEADERS + b"Nothing to see.\r\n")
    assert scanned == [b"Nothing to see.\r\n"]
    assert result.accepted
    eom = result.reply("eom")
    assert eom is not None
    assert eom is result.replies[-1]
    assert eom.answer.progress >= 2
    assert result.modifications == [AddHeader(name="X-Scanned", value="clean")]


def test_slow_check_does_not_send_progress_for_a_quick_scan(
    slow_check: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def quick_scanner(body: bytes) -> bool:
        return True

    monkeypatch.setattr(slow_check, "external_verdict", quick_scanner)
    with MilterTestClient(slow_check.app) as client:
        result = client.send_message(HEADERS + b"Nothing to see.\r\n")
    eom = result.reply("eom")
    assert eom is not None
    assert eom.answer.progress == 0
    assert result.accepted


def test_slow_check_tempfails_when_the_scanner_fails(
    slow_check: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken_scanner(body: bytes) -> bool:
        raise ConnectionRefusedError("scanner unreachable")

    monkeypatch.setattr(slow_check, "external_verdict", broken_scanner)
    # raise_errors=False: the app's own fallback reply, as in production.
    with MilterTestClient(slow_check.app, raise_errors=False) as client:
        result = client.send_message(HEADERS + b"Nothing to see.\r\n")
    assert result.tempfailed
    assert result.stage == "eom"
    assert result.modifications == []
    assert result.delivered is None
