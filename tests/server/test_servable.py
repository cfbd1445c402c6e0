"""What the server serves: the Serving handle, and telling an outcome from a coroutine."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Generator
from typing import Any

import pytest

from milterapp.app import App
from milterapp.errors import ServerError, ServerErrorKind
from milterapp.replies import Accept, Reject, Shutdown
from milterapp.server.servable import Outcome, Serving, decided


def test_serving_runs_one_server_at_a_time_and_stops_it() -> None:
    serving, stops = Serving("guard"), []
    assert not serving.started
    assert not serving.running
    serving.stop()  # nobody serves: nothing happens
    serving.attach(lambda: stops.append("first"))
    assert serving.running
    with pytest.raises(ServerError, match="'guard' is already serving") as caught:
        serving.attach(lambda: stops.append("second"))
    assert caught.value.kind is ServerErrorKind.RUNNING
    serving.stop()
    assert stops == ["first"]


def test_serving_detaches_only_the_server_that_attached() -> None:
    serving = Serving("guard")

    def ours() -> None: ...

    def theirs() -> None: ...

    serving.attach(ours)
    serving.detach(theirs)  # a server that stopped after a newer one started
    assert serving.running
    serving.detach(ours)
    assert not serving.running


def test_app_exposes_its_serving_state_through_its_hooks() -> None:
    app = App("guard")
    assert not app.serving.started
    asyncio.run(app.run_startup())
    assert app.serving.started
    assert not app.serving.running
    app.shutdown()  # not serving: nothing happens


class _Reject(Reject):
    """A verdict of the user's own class."""


class _Awaitable(Coroutine[Any, Any, Outcome]):
    """A coroutine that is not Python's own."""

    def send(self, value: Any) -> Any:
        raise StopIteration(None)

    def throw(self, *args: Any) -> Any:
        raise StopIteration(None)

    def __await__(self) -> Generator[Any, None, Outcome]:
        return None
        yield


@pytest.mark.parametrize(
    "result", [None, Accept(), Reject(), Shutdown(), _Reject(code=550)], ids=repr
)
def test_outcomes_are_decided(result: Outcome) -> None:
    assert decided(result)


def test_coroutines_are_not_decided() -> None:
    async def later() -> Outcome:
        return None

    native = later()
    assert not decided(native)
    native.close()
    assert not decided(_Awaitable())
