"""The two ways through a dispatch give the same answers.

``App.dispatch_now()`` runs plain handlers in place and hands the rest of the chain to a
coroutine from the first handler that must be awaited (an async handler,
a plain one that returned a coroutine, or one that raised). Whatever mix of plain and async
handlers, and wherever the switch happens, the combined reply and the handlers that ran must
be those of an all-plain chain.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import structlog.testing
from hypothesis import given
from hypothesis import strategies as st

from milterapp.app import App
from milterapp.context import Context
from milterapp.events import Abort, Body
from milterapp.replies import Accept, Continue, Discard, Reject, Skip, TempFail

OUTCOMES = {
    "none": None,
    "continue": Continue(),
    "accept": Accept(),
    "reject": Reject(),
    "tempfail": TempFail(),
    "discard": Discard(),
    "skip": Skip(),
    "raise": ValueError("handler bug"),
    "invalid": "not a reply",
}
KINDS = ("plain", "async", "coroutine")  # coroutine: a plain function returning a coroutine

chains = st.lists(
    st.tuples(st.sampled_from(sorted(OUTCOMES)), st.sampled_from(KINDS)), min_size=1, max_size=5
)


def build(chain: list[tuple[str, str]], ran: list[int]) -> App:
    app = App("paths")
    for index, (outcome, kind) in enumerate(chain):
        app.on("body")(handler(index, OUTCOMES[outcome], kind, ran))  # type: ignore[call-overload]
    return app


def handler(index: int, outcome: object, kind: str, ran: list[int]) -> Callable[..., Any]:
    def give() -> object:
        ran.append(index)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    if kind == "async":

        async def async_handler(event: Body) -> object:
            await asyncio.sleep(0)
            return give()

        return async_handler
    if kind == "coroutine":

        def returns_coroutine(event: Body) -> object:
            async def later() -> object:
                return give()

            return later()

        return returns_coroutine

    def plain(event: Body) -> object:
        return give()

    return plain


def dispatch(app: App) -> tuple[object, bool]:
    """Dispatch a body event through dispatch_now; return the reply and whether it was
    answered in place."""
    ctx = Context(app_name="paths", conn_id="1", peer="test", macros={})

    async def main() -> tuple[object, bool]:
        result = app.dispatch_now("body", Body(chunk=b"x"), ctx)
        if isinstance(result, Coroutine):
            return await result, False
        return result, True

    with structlog.testing.capture_logs():
        return asyncio.run(main())


@given(chains)
def test_any_mix_of_plain_and_async_handlers_answers_as_all_plain(
    chain: list[tuple[str, str]],
) -> None:
    ran: list[int] = []
    result, in_place = dispatch(build(chain, ran))
    plain_ran: list[int] = []
    expected, _ = dispatch(build([(outcome, "plain") for outcome, _ in chain], plain_ran))
    assert result == expected
    assert ran == plain_ran
    # In place exactly when every handler that ran is plain and gave a valid reply.
    ran_chain = [chain[index] for index in ran]
    assert in_place == all(
        kind == "plain" and outcome not in ("raise", "invalid") for outcome, kind in ran_chain
    )


def test_plain_handlers_that_all_return_none_give_continue_in_place() -> None:
    result, in_place = dispatch(build([("none", "plain"), ("none", "plain")], []))
    assert result == Continue()
    assert in_place


def test_observers_give_none_either_way() -> None:
    for kind in KINDS:
        app = App("observers")
        app.on("abort")(handler(0, None, kind, []))  # type: ignore[call-overload]
        ctx = Context(app_name="o", conn_id="1", peer="test", macros={})

        async def main(app: App = app, ctx: Context = ctx) -> object:
            return await app.dispatch("abort", Abort(), ctx)

        assert asyncio.run(main()) is None
