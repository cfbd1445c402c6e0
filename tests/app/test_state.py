"""Typed state: ``App(message_state=..., connection_state=...)``, ``ctx.message.state`` and
``ctx.state`` (issue 14)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
from pydantic import BaseModel

from milterapp import App, Context, EndOfMessage, Header, Reject, SetupError
from milterapp.handlers import CloseEvent
from milterapp.testing import MilterTestClient

SPAM = b"From: a@example.org\r\nX-Spam: yes\r\nX-Spam: yes\r\n\r\nbuy\r\n"
HAM = b"From: a@example.org\r\nSubject: hi\r\n\r\nhello\r\n"


@dataclass
class Scores:
    score: int = 0
    reasons: list[str] = field(default_factory=list)


@dataclass
class Session:
    messages: int = 0
    scores: list[int] = field(default_factory=list)


class ModelScores(BaseModel):
    score: int = 0


def scoring_app(**options: Any) -> tuple[App, list[Any]]:
    app = App("scores", message_state=Scores, connection_state=Session, **options)
    seen: list[Any] = []

    @app.on("header")
    def score(event: Header, ctx: Context[Scores, Session]) -> None:
        if event.name == "X-Spam":
            ctx.message.state.score += 3
            ctx.message.state.reasons.append("x-spam")

    @app.on("eom")
    def decide(event: EndOfMessage, ctx: Context[Scores, Session]) -> Reject | None:
        ctx.state.messages += 1
        ctx.state.scores.append(ctx.message.state.score)
        seen.append(ctx.message.state)
        if ctx.message.state.score >= 5:
            return Reject(text=",".join(ctx.message.state.reasons))
        return None

    @app.on("close")
    def closed(event: CloseEvent, ctx: Context[Scores, Session]) -> None:
        seen.append(ctx.state)

    return app, seen


def test_each_message_gets_a_fresh_instance_and_the_connection_keeps_its_own() -> None:
    app, seen = scoring_app()
    with MilterTestClient(app) as client:
        spam = client.send_message(SPAM)
        ham = client.send_message(HAM)
        again = client.send_message(SPAM)
    assert spam.rejected
    assert ham.accepted
    assert again.rejected
    first, second, third, session = seen
    assert first == Scores(score=6, reasons=["x-spam", "x-spam"])
    assert second == Scores()  # not the first message's state carried over
    assert third == first
    assert first is not third
    assert session == Session(messages=3, scores=[6, 0, 6])


def test_a_new_connection_gets_a_new_connection_state() -> None:
    app, seen = scoring_app()
    for _ in range(2):
        with MilterTestClient(app) as client:
            client.send_message(HAM)
    sessions = [item for item in seen if isinstance(item, Session)]
    assert sessions == [Session(messages=1, scores=[0]), Session(messages=1, scores=[0])]
    assert sessions[0] is not sessions[1]


def test_an_aborted_message_drops_its_state() -> None:
    app = App("abort", message_state=Scores)
    states: list[Scores] = []

    @app.on("header")
    def count(event: Header, ctx: Context[Scores]) -> None:
        ctx.message.state.score += 1

    @app.on("eom")
    def keep(event: EndOfMessage, ctx: Context[Scores]) -> None:
        states.append(ctx.message.state)

    with MilterTestClient(app) as client:
        client.connect()
        client.abort()
        client.send_message(HAM)
    assert states == [Scores(score=2)]


def test_a_pydantic_model_or_any_callable_works_as_state() -> None:
    app = App("model", message_state=ModelScores, connection_state=lambda: {"n": 0})
    seen: list[Any] = []

    @app.on("eom")
    def keep(event: EndOfMessage, ctx: Context[ModelScores, dict[str, int]]) -> None:
        ctx.message.state.score = 4
        ctx.state["n"] += 1
        seen.append((ctx.message.state, dict(ctx.state)))

    with MilterTestClient(app) as client:
        client.send_message(HAM)
    assert seen == [(ModelScores(score=4), {"n": 1})]


def test_without_declared_state_both_are_dicts() -> None:
    app = App("plain")
    seen: list[Any] = []

    @app.on("eom")
    def keep(event: EndOfMessage, ctx: Context) -> None:
        ctx.message.state["score"] = 1
        ctx.state["messages"] = ctx.state.get("messages", 0) + 1
        seen.append((ctx.message.state, ctx.state))

    with MilterTestClient(app) as client:
        client.send_message(HAM)
        client.send_message(HAM)
    assert seen[0][0] == {"score": 1}
    assert seen[0][0] is not seen[1][0]
    assert seen[1][1] == {"messages": 2}


def test_free_attributes_on_the_message_still_work() -> None:
    app = App("free")
    seen: list[int] = []

    @app.on("header")
    def count(event: Header, ctx: Context) -> None:
        ctx.message.count = getattr(ctx.message, "count", 0) + 1

    @app.on("eom")
    def keep(event: EndOfMessage, ctx: Context) -> None:
        seen.append(ctx.message.count)

    with MilterTestClient(app) as client:
        client.send_message(HAM)
    assert seen == [2]


def test_a_typo_on_the_message_points_to_the_state() -> None:
    app = App("typo")

    @app.on("eom")
    def typo(event: EndOfMessage, ctx: Context) -> None:
        ctx.message.scroe += 1

    with MilterTestClient(app) as client, pytest.raises(AttributeError, match="message_state"):
        client.send_message(HAM)


@dataclass
class NeedsArgument:
    score: int


@pytest.mark.parametrize("option", ["message_state", "connection_state"])
def test_a_state_class_that_needs_arguments_is_refused_at_once(option: str) -> None:
    with pytest.raises(SetupError, match=rf"{option}=NeedsArgument .*give every field a default"):
        App("t", **{option: NeedsArgument})


def test_a_state_that_is_not_callable_is_refused() -> None:
    with pytest.raises(SetupError, match="message_state"):
        App("t", message_state=Scores())
