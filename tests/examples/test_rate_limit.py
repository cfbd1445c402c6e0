"""examples/rate_limit.py: one client address may send LIMIT messages per WINDOW seconds."""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType, SimpleNamespace

import pytest

from milterapp import TempFail
from milterapp.testing import MilterTestClient

MESSAGE = b"Subject: hi\r\n\r\nHello.\r\n"
SLOW_DOWN = TempFail(code=450, xcode="4.7.1", text="too many messages, slow down")


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def rate_limit(load_example: Callable[[str], ModuleType]) -> ModuleType:
    module = load_example("rate_limit")  # a fresh module: its own, empty `recent`
    assert not module.recent
    return module


@pytest.fixture
def clock(rate_limit: ModuleType, monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock()
    # Only the example's own view of the time module changes; asyncio keeps the real clock.
    monkeypatch.setattr(rate_limit, "time", SimpleNamespace(monotonic=clock.monotonic))
    return clock


def test_rate_limit_tempfails_the_31st_message_from_one_client_address(
    rate_limit: ModuleType, clock: Clock
) -> None:
    assert rate_limit.LIMIT == 30
    # The count is per client address, across connections: 20 messages, then 10 more.
    with MilterTestClient(rate_limit.app) as client:
        client.connect(client_address="192.0.2.10")
        first = [client.send_message(MESSAGE) for _ in range(20)]
    with MilterTestClient(rate_limit.app) as client:
        client.connect(client_address="192.0.2.10")
        second = [client.send_message(MESSAGE) for _ in range(10)]
        clock.now += 59.0  # still within the window
        refused = client.send_message(MESSAGE)
    assert all(result.accepted for result in first + second)
    assert refused.tempfailed
    assert refused.stage == "envfrom"
    assert refused.verdict == SLOW_DOWN
    assert refused.delivered is None


def test_rate_limit_leaves_other_client_addresses_alone(
    rate_limit: ModuleType, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(rate_limit, "LIMIT", 3)
    with MilterTestClient(rate_limit.app) as busy, MilterTestClient(rate_limit.app) as other:
        busy.connect(client_address="192.0.2.10")
        other.connect(client_address="2001:db8::25")
        busy_results = [busy.send_message(MESSAGE) for _ in range(4)]
        other_results = [other.send_message(MESSAGE) for _ in range(3)]
    assert [r.accepted for r in busy_results] == [True, True, True, False]
    assert busy_results[-1].verdict == SLOW_DOWN
    assert all(r.accepted for r in other_results)


def test_rate_limit_accepts_again_once_the_window_has_passed(
    rate_limit: ModuleType, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(rate_limit, "LIMIT", 2)
    with MilterTestClient(rate_limit.app) as client:
        assert client.send_message(MESSAGE).accepted  # at t
        clock.now += 30.0
        assert client.send_message(MESSAGE).accepted  # at t + 30
        assert client.send_message(MESSAGE).tempfailed
        clock.now += 30.5  # the first message left the window, the second did not
        assert client.send_message(MESSAGE).accepted
        assert client.send_message(MESSAGE).tempfailed
        clock.now += rate_limit.WINDOW + 1
        assert client.send_message(MESSAGE).accepted
