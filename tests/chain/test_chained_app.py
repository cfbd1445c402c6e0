"""An App with upstream milters: real upstreams (milterapp apps served on loopback) behind an
app driven by the testing kit as Postfix or Sendmail would drive it."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal

import pytest

from milterapp import App
from milterapp.context import Context
from milterapp.events import Body, EndOfMessage, EnvFrom, EnvRcpt, Header
from milterapp.replies import (
    Accept,
    AddHeader,
    ChangeHeader,
    Continue,
    Discard,
    InsertHeader,
    Reject,
    ReplaceBody,
    TempFail,
)
from milterapp.testing import AsyncMilterTestClient, serving
from tests.server.support import run

MESSAGE = (
    b"From: a@example.org\r\nTo: b@example.net\r\nSubject: hi\r\n\r\nfirst line\r\nsecond line\r\n"
)


@contextlib.asynccontextmanager
async def served(*apps: App) -> AsyncIterator[list[str]]:
    """Serve each app on loopback; yield their specs."""
    async with contextlib.AsyncExitStack() as stack:
        yield [await stack.enter_async_context(serving(app)) for app in apps]


def recorder(name: str, seen: list[tuple[str, Any]], **replies: Any) -> App:
    """An upstream that records what it is sent (``(stage, what)``) and answers ``replies``
    by stage (a reply, or a function of the event and context)."""
    app = App(name, keep_message=True)

    def answer(stage: str, event: Any, ctx: Context) -> Any:
        reply = replies.get(stage)
        return reply(event, ctx) if callable(reply) else reply

    @app.on("envfrom")
    def mail(event: EnvFrom, ctx: Context) -> Any:
        seen.append(("envfrom", event.address))
        return answer("envfrom", event, ctx)

    @app.on("envrcpt")
    def rcpt(event: EnvRcpt, ctx: Context) -> Any:
        seen.append(("envrcpt", event.address))
        return answer("envrcpt", event, ctx)

    @app.on("header")
    def header(event: Header, ctx: Context) -> Any:
        seen.append(("header", (event.name, event.value)))
        return answer("header", event, ctx)

    @app.on("eom")
    def eom(event: EndOfMessage, ctx: Context) -> Any:
        seen.append(("body", ctx.message.body_bytes()))
        return answer("eom", event, ctx)

    return app


@contextlib.asynccontextmanager
async def through_chain(
    *upstreams: App,
    own: Callable[[App], None] | None = None,
    mta: Literal["postfix", "sendmail"] = "postfix",
) -> AsyncIterator[AsyncMilterTestClient]:
    """The testing kit's client of an app that chains ``upstreams`` (served on loopback)."""
    async with (
        served(*upstreams) as specs,
        AsyncMilterTestClient(chain(*specs, own=own), mta=mta) as client,
    ):
        yield client


def chain(*specs: str, own: Callable[[App], None] | None = None, **options: Any) -> App:
    app = App("front")
    for at, spec in enumerate(specs):
        app.use_milter(spec, name=f"up{at}", **{"reuse": False, **options})
    if own is not None:
        own(app)
    return app


def test_an_envelope_refusal_by_an_upstream_answers_and_later_parties_are_not_asked() -> None:
    first: list[tuple[str, Any]] = []
    second: list[tuple[str, Any]] = []
    refuse = Reject(code=550, xcode="5.7.1", text="not you")

    async def main() -> None:
        ups = recorder("one", first, envfrom=lambda e, c: refuse if "bad" in e.address else None)
        async with through_chain(ups, recorder("two", second)) as client:
            refused = await client.send_message(MESSAGE, sender="bad@example.org")
            passed = await client.send_message(MESSAGE)
        assert (refused.verdict, refused.stage) == (refuse, "envfrom")
        assert passed.verdict == Continue()
        assert passed.delivered is not None

    run(main())
    assert [s for s in first if s[0] == "envfrom"] == [
        ("envfrom", "bad@example.org"),
        ("envfrom", "sender@example.org"),
    ]
    assert [s for s in second if s[0] == "envfrom"] == [("envfrom", "sender@example.org")]


def test_a_refused_recipient_is_that_recipient_only_and_the_message_goes_on() -> None:
    seen: list[tuple[str, Any]] = []

    def own(app: App) -> None:
        @app.on("envrcpt")
        def rcpt(event: EnvRcpt) -> TempFail | None:
            return TempFail() if event.address.startswith("full") else None

    async def main() -> None:
        async with through_chain(recorder("one", seen), own=own) as client:
            result = await client.send_message(
                MESSAGE, recipients=["full@example.net", "ok@example.net"]
            )
        assert result.verdict == Continue()
        assert result.recipients["full@example.net"] == TempFail()
        assert result.delivered is not None
        assert result.delivered.recipients == ("ok@example.net",)

    run(main())
    # The own handlers come first: the refused recipient never reached the upstream.
    assert [s for s in seen if s[0] == "envrcpt"] == [("envrcpt", "ok@example.net")]
    assert ("body", b"first line\r\nsecond line\r\n") in seen


def test_an_upstreams_accept_ends_its_part_only() -> None:
    first: list[tuple[str, Any]] = []
    second: list[tuple[str, Any]] = []

    async def main() -> None:
        async with through_chain(
            recorder("one", first, envfrom=Accept()),
            recorder("two", second, eom=lambda e, c: c.add_header("X-Two", "yes")),
        ) as client:
            result = await client.send_message(MESSAGE)
        assert result.verdict == Continue()
        assert result.delivered is not None
        assert result.delivered.header("X-Two") == "yes"

    run(main())
    assert [s[0] for s in first] == ["envfrom"]  # done with the message at MAIL
    assert [s[0] for s in second].count("body") == 1


def test_accept_from_every_party_is_accept() -> None:
    async def main() -> None:
        async with through_chain(recorder("one", [], envfrom=Accept())) as client:
            result = await client.send_message(MESSAGE)
        assert (result.verdict, result.stage) == (Accept(), "envfrom")

    run(main())


def test_discard_at_end_of_message_drops_the_message_and_its_edits() -> None:
    second: list[tuple[str, Any]] = []

    def discard(event: EndOfMessage, ctx: Context) -> Discard | None:
        ctx.add_header("X-Lost", "1")
        return Discard() if ctx.message.sender.address.startswith("drop") else None

    async def main() -> None:
        upstreams = recorder("one", [], eom=discard), recorder("two", second)
        async with through_chain(*upstreams) as client:
            result = await client.send_message(MESSAGE, sender="drop@example.org")
            after = await client.send_message(MESSAGE)
        assert (result.verdict, result.modifications) == (Discard(), [])
        assert after.verdict == Continue()

    run(main())
    # The second upstream saw the envelope of both, the content of the second only.
    assert [s[0] for s in second].count("envfrom") == 2
    assert [s[0] for s in second].count("body") == 1


def test_each_upstream_sees_the_edits_of_those_before_it_and_indexes_stay_right() -> None:
    second: list[tuple[str, Any]] = []

    def first_edits(event: EndOfMessage, ctx: Context) -> None:
        ctx.insert_header(1, "X-First", "top")
        ctx.add_header("Subject", "another")
        ctx.change_header("To", "c@example.net")
        ctx.replace_body(b"replaced by one\r\n")

    def second_edits(event: EndOfMessage, ctx: Context) -> None:
        # The second Subject is the one the first upstream added.
        ctx.change_header("Subject", "changed by two", index=2)
        ctx.insert_header(2, "X-Second", "below X-First")

    def own(app: App) -> None:
        @app.on("eom")
        def stamp(event: EndOfMessage, ctx: Context) -> None:
            ctx.add_header("X-Own", "first of all")

    async def main() -> None:
        async with (
            served(
                recorder("one", [], eom=first_edits), recorder("two", second, eom=second_edits)
            ) as specs,
            AsyncMilterTestClient(chain(*specs, own=own)) as client,
        ):
            result = await client.send_message(MESSAGE)
        assert result.verdict == Continue()
        delivered = result.delivered
        assert delivered is not None
        assert [name for name, _ in delivered.headers] == [
            "Received",
            "X-First",
            "X-Second",
            "From",
            "To",
            "Subject",
            "X-Own",
            "Subject",
        ]
        assert delivered.headers_named("Subject") == ["hi", "changed by two"]
        assert delivered.header("To") == "c@example.net"
        assert delivered.body == b"replaced by one\r\n"
        # One body replacement, after the header edits, all of them in the chain's order.
        kinds = [type(m) for m in result.modifications]
        assert kinds == [
            AddHeader,
            InsertHeader,
            AddHeader,
            ChangeHeader,
            ChangeHeader,
            InsertHeader,
            ReplaceBody,
        ]

    run(main())
    headers = [what for stage, what in second if stage == "header"]
    assert headers == [
        ("X-First", "top"),
        ("From", "a@example.org"),
        ("To", "c@example.net"),
        ("Subject", "hi"),
        ("X-Own", "first of all"),
        ("Subject", "another"),
    ]
    assert ("body", b"replaced by one\r\n") in second


@pytest.mark.parametrize("mta", ["postfix", "sendmail"])
def test_the_view_follows_the_mtas_rules_for_added_headers(mta: str) -> None:
    second: list[tuple[str, Any]] = []

    async def main() -> None:
        first = recorder("one", [], eom=lambda e, c: c.add_header("Subject", "added"))
        async with through_chain(first, recorder("two", second), mta=mta) as client:  # type: ignore[arg-type]
            await client.send_message(MESSAGE)

    run(main())
    subjects = [what[1] for stage, what in second if stage == "header" and what[0] == "Subject"]
    # Postfix appends; Sendmail puts an added header above the first of the same name.
    assert subjects == (["hi", "added"] if mta == "postfix" else ["added", "hi"])


def test_own_handlers_can_come_after_the_upstreams() -> None:
    order: list[str] = []

    async def main() -> None:
        up = recorder("one", [], envfrom=lambda e, c: order.append("upstream"))
        async with served(up) as specs:
            app = App("front")
            app.use_milter(specs[0], name="one", reuse=False)
            app.use_handlers()

            @app.on("envfrom")
            def mail(event: EnvFrom) -> None:
                order.append("own")

            async with AsyncMilterTestClient(app) as client:
                await client.send_message(MESSAGE)

    run(main())
    assert order == ["upstream", "own"]


def test_a_body_skip_by_the_own_handlers_does_not_starve_the_upstreams() -> None:
    seen: list[tuple[str, Any]] = []
    chunks: list[bytes] = []

    def own(app: App) -> None:
        @app.on("body")
        def body(event: Body) -> Any:
            from milterapp.replies import Skip

            chunks.append(event.chunk)
            return Skip()

    async def main() -> None:
        async with through_chain(recorder("one", seen), own=own) as client:
            result = await client.send_message(MESSAGE + b"x" * 200_000)
        assert result.verdict == Continue()

    run(main())
    assert len(chunks) == 1  # the own handler was not asked again
    body = next(what for stage, what in seen if stage == "body")
    assert body.endswith(b"x" * 1000 + b"\r\n")
