"""examples/greylist.py against a private Redis: first attempts wait, retries pass.

Each test runs in one event loop (the example's redis-py client belongs to the loop that
first used it) and ends with the app's shutdown hooks, which close that client.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from types import ModuleType, SimpleNamespace

import pytest

from milterapp import Continue, TempFail
from milterapp.testing import AsyncMilterTestClient

MESSAGE = b"From: sender@partner.example\r\nSubject: hi\r\n\r\nHello.\r\n"
GREYLISTED = TempFail(code=451, xcode="4.7.1", text="greylisted, please try again later")


class Clock:
    """The wall clock as the example sees it; the test moves it by hand."""

    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def time(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def load_greylist(
    redis_url: str,
    load_example: Callable[[str], ModuleType],
    clock: Clock,
    monkeypatch: pytest.MonkeyPatch,
) -> Callable[[], ModuleType]:
    """Load a copy of the example (one "milter host") using the private Redis and the clock."""
    monkeypatch.setenv("REDIS_URL", redis_url)  # read when the example is loaded

    def load() -> ModuleType:
        module = load_example("greylist")
        monkeypatch.setattr(module, "time", SimpleNamespace(time=clock.time))
        return module

    return load


def run(test: Callable[[], Awaitable[None]], *modules: ModuleType) -> None:
    """Run ``test`` in a new event loop, then the shutdown hooks of each example copy."""

    async def main() -> None:
        try:
            await test()
        finally:
            for module in modules:
                await module.app.run_shutdown()

    asyncio.run(asyncio.wait_for(main(), 30))


def test_greylist_tempfails_first_attempts_and_accepts_a_retry_after_the_delay(
    load_greylist: Callable[[], ModuleType], clock: Clock
) -> None:
    greylist = load_greylist()

    async def attempts() -> None:
        async with AsyncMilterTestClient(greylist.app) as client:
            first = await client.send_message(MESSAGE, sender="sender@partner.example")
            assert first.tempfailed
            assert first.stage == "envrcpt"
            assert first.verdict == GREYLISTED
            assert first.delivered is None

            clock.now += greylist.DELAY - 1  # too early
            early = await client.send_message(MESSAGE, sender="sender@partner.example")
            assert early.tempfailed
            assert early.verdict == GREYLISTED

            clock.now += 2  # DELAY + 1 seconds after the first attempt
            late = await client.send_message(MESSAGE, sender="sender@partner.example")
            assert late.accepted
            assert late.delivered is not None
            assert late.delivered.recipients == ("recipient@example.net",)

            clock.now += 3600  # known now: no more waiting
            again = await client.send_message(MESSAGE, sender="Sender@Partner.Example")
            assert again.accepted

    run(attempts, greylist)


def test_greylist_keeps_triplets_apart(
    load_greylist: Callable[[], ModuleType], clock: Clock
) -> None:
    greylist = load_greylist()

    async def attempts() -> None:
        async with AsyncMilterTestClient(greylist.app) as client:
            await client.connect(client_address="192.0.2.10")
            first = await client.send_message(MESSAGE, recipients=["alice@example.org"])
            assert first.verdict == GREYLISTED
            clock.now += greylist.DELAY + 1
            # Same client and sender: alice is known now, bob is a new triplet.
            mixed = await client.send_message(
                MESSAGE, recipients=["alice@example.org", "bob@example.org"]
            )
            assert mixed.accepted
            assert mixed.recipients == {
                "alice@example.org": Continue(),
                "bob@example.org": GREYLISTED,
            }
            assert mixed.delivered is not None
            assert mixed.delivered.recipients == ("alice@example.org",)
            # Another sender to the known recipient is a new triplet as well.
            other = await client.send_message(
                MESSAGE, sender="someone@else.example", recipients=["alice@example.org"]
            )
            assert other.verdict == GREYLISTED
        # And so is the known sender and recipient from another client address.
        async with AsyncMilterTestClient(greylist.app) as client:
            await client.connect(client_address="198.51.100.7")
            moved = await client.send_message(MESSAGE, recipients=["alice@example.org"])
            assert moved.verdict == GREYLISTED

    run(attempts, greylist)


def test_greylist_state_is_shared_by_two_milter_hosts_through_redis(
    load_greylist: Callable[[], ModuleType], clock: Clock
) -> None:
    host_a, host_b = load_greylist(), load_greylist()
    assert host_a.app is not host_b.app
    assert host_a.store is not host_b.store

    async def attempts() -> None:
        # The MTA's first attempt reaches one milter host...
        async with AsyncMilterTestClient(host_a.app) as client:
            first = await client.send_message(MESSAGE, sender="sender@partner.example")
            assert first.verdict == GREYLISTED
        # ...a too-early retry reaches the other, which knows the triplet already...
        clock.now += 10
        async with AsyncMilterTestClient(host_b.app, mta="sendmail") as client:
            early = await client.send_message(MESSAGE, sender="sender@partner.example")
            assert early.verdict == GREYLISTED
        # ...and so does the retry after the delay, which it accepts.
        clock.now += host_b.DELAY
        async with AsyncMilterTestClient(host_b.app) as client:
            late = await client.send_message(MESSAGE, sender="sender@partner.example")
            assert late.accepted

    run(attempts, host_a, host_b)


def test_greylist_keeps_a_known_triplet_for_keep_seconds(
    load_greylist: Callable[[], ModuleType], clock: Clock, redis_url: str
) -> None:
    import redis

    greylist = load_greylist()

    async def attempts() -> None:
        async with AsyncMilterTestClient(greylist.app) as client:
            await client.send_message(MESSAGE, sender="sender@partner.example")
            clock.now += greylist.DELAY
            assert (await client.send_message(MESSAGE, sender="sender@partner.example")).accepted

    run(attempts, greylist)
    with redis.Redis.from_url(redis_url) as store:
        [key] = store.keys("greylist:*")
        assert key == b"greylist:192.0.2.10:sender@partner.example:recipient@example.net"
        assert store.get(key) == str(int(clock.now - greylist.DELAY)).encode()
        assert greylist.KEEP - 60 < store.ttl(key) <= greylist.KEEP
