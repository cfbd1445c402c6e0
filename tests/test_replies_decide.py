"""decide(): how the replies of several handlers of one event combine into one verdict."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from milterapp.replies import (
    RESTRICTIVE,
    Accept,
    Continue,
    Discard,
    Reject,
    Shutdown,
    Skip,
    TempFail,
    Verdict,
    decide,
)

Result = Verdict | Shutdown | None

RESTRICTIVE_REPLIES: list[Verdict | Shutdown] = [
    Reject(),
    Reject(code=554, xcode="5.7.1", text="go away"),
    TempFail(),
    TempFail(code=421, text="closing"),
    Discard(),
    Shutdown(),
]
ALL_REPLIES: list[Result] = [None, Continue(), Accept(), Skip(), *RESTRICTIVE_REPLIES]


class Recording:
    """An iterator over ``items`` that counts how many of them were taken."""

    def __init__(self, items: Iterable[Result]) -> None:
        self.items = list(items)
        self.taken = 0

    def __iter__(self) -> Iterator[Result]:
        for item in self.items:
            self.taken += 1
            yield item


def reference(results: list[Result]) -> tuple[Verdict | Shutdown, int]:
    """The rule, written plainly: (verdict, number of results it had to look at)."""
    for position, result in enumerate(results):
        if isinstance(result, Reject | TempFail | Discard | Shutdown):
            return result, position + 1
    if any(type(result) is Accept for result in results):
        return Accept(), len(results)
    if results and all(type(result) is Skip for result in results):
        return Skip(), len(results)
    return Continue(), len(results)


def test_restrictive_is_exactly_the_refusals() -> None:
    assert set(RESTRICTIVE) == {Reject, TempFail, Discard, Shutdown}


def test_empty_gives_continue() -> None:
    assert decide([]) == Continue()


@pytest.mark.parametrize(
    "results",
    [[None], [Continue()], [None, None], [Continue(), None, Continue()]],
)
def test_no_opinion_and_continue_give_continue(results: list[Result]) -> None:
    assert decide(results) == Continue()


@pytest.mark.parametrize(
    "results",
    [
        [Accept()],
        [Accept(), None],
        [None, Continue(), Accept()],
        [Accept(), Continue(), Accept()],
        [Skip(), Accept()],
        [Accept(), Skip()],
    ],
)
def test_accept_anywhere_gives_accept(results: list[Result]) -> None:
    assert decide(results) == Accept()


@pytest.mark.parametrize("refusal", RESTRICTIVE_REPLIES)
def test_a_refusal_after_accept_still_wins(refusal: Verdict | Shutdown) -> None:
    assert decide([Accept(), Continue(), refusal]) is refusal


@pytest.mark.parametrize("refusal", RESTRICTIVE_REPLIES)
@pytest.mark.parametrize("before", [[], [None], [Accept()], [Skip(), Continue()]])
def test_first_refusal_wins_and_nothing_after_it_is_consumed(
    refusal: Verdict | Shutdown, before: list[Result]
) -> None:
    later = [Accept(), Reject(text="later"), TempFail(text="later"), None]
    results = Recording([*before, refusal, *later])
    assert decide(results) is refusal
    assert results.taken == len(before) + 1


def test_first_of_several_refusals_wins() -> None:
    first = TempFail(text="first")
    results = Recording([None, first, Reject(text="second"), Discard()])
    assert decide(results) is first
    assert results.taken == 2


def test_a_generator_is_not_run_past_the_refusal() -> None:
    ran: list[int] = []

    def handlers() -> Iterator[Result]:
        for number, reply in enumerate([Continue(), Reject(), Accept(), None]):
            ran.append(number)
            yield reply

    assert decide(handlers()) == Reject()
    assert ran == [0, 1]


def test_all_results_are_consumed_without_a_refusal() -> None:
    results = Recording([None, Accept(), Skip(), Continue()])
    assert decide(results) == Accept()
    assert results.taken == 4


@pytest.mark.parametrize("count", [1, 2, 5])
def test_all_skip_gives_skip(count: int) -> None:
    assert decide([Skip()] * count) == Skip()


@pytest.mark.parametrize(
    "results",
    [[Skip(), Continue()], [Continue(), Skip()], [Skip(), None], [None, Skip(), Skip()]],
)
def test_skip_with_continue_or_no_opinion_gives_continue(results: list[Result]) -> None:
    assert decide(results) == Continue()


def test_decide_returns_a_verdict_instance_not_the_class() -> None:
    for results in ([], [Accept()], [Skip()], [None]):
        assert isinstance(decide(results), Continue | Accept | Skip)


@given(st.lists(st.sampled_from(ALL_REPLIES), max_size=12))
def test_decide_matches_the_reference(results: list[Result]) -> None:
    expected, consumed = reference(results)
    recording = Recording(results)
    got = decide(recording)
    assert got == expected
    assert type(got) is type(expected)
    if isinstance(expected, RESTRICTIVE):
        assert got is expected  # the handler's own reply, with its code and text
    assert recording.taken == consumed
