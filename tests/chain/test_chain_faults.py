"""A chain under faults and conditions: failure policies, back-off, deadlines with progress,
conditions, connection reuse and header conventions, against real upstreams on loopback."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import structlog.testing

from milterapp import App
from milterapp.chain.party import FIRST_RETRY
from milterapp.context import Context
from milterapp.events import Connect, EndOfMessage, Header
from milterapp.replies import Accept, Continue, Quarantine, Reject, TempFail
from milterapp.testing import AsyncMilterTestClient, serving
from tests.chain.test_chained_app import MESSAGE, recorder, served
from tests.chain.test_upstream import fake_upstream, free_port, negotiated, read_packet
from tests.server.support import run


def nowhere() -> str:
    return f"inet:{free_port()}@[127.0.0.1]"


def own_stamp(app: App) -> None:
    @app.on("eom")
    def stamp(event: EndOfMessage, ctx: Context) -> None:
        ctx.add_header("X-Own", "1")


@pytest.mark.parametrize(
    ("policy", "verdict"),
    [("tempfail", TempFail()), ("reject", Reject()), ("accept", Continue())],
)
def test_an_unreachable_upstream_gets_its_policy(policy: str, verdict: Any) -> None:
    async def main() -> None:
        app = App("front")
        app.use_milter(nowhere(), name="gone", on_failure=policy)  # type: ignore[arg-type]
        own_stamp(app)
        with structlog.testing.capture_logs() as logs:
            async with AsyncMilterTestClient(app) as client:
                result = await client.send_message(MESSAGE)
        assert result.verdict == verdict
        if policy == "accept":  # went on without it: the own handlers' edit is there
            assert result.delivered is not None
            assert result.delivered.header("X-Own") == "1"
        failed = [entry for entry in logs if entry["event"] == "upstream_failed"]
        assert failed[0]["upstream"] == "gone"
        assert failed[0]["kind"] == "unreachable"
        assert failed[0]["policy"] == policy

    run(main())


def test_a_failed_upstream_is_not_tried_again_before_its_back_off() -> None:
    connections = 0
    now = [1000.0]

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1  # and close without answering the negotiation

    async def main() -> None:
        async with fake_upstream(hang_up) as spec:
            app = App("front")
            upstream = app.use_milter(spec, name="flaky", on_failure="accept")
            upstream._clock = lambda: now[0]
            own_stamp(app)
            for _ in range(3):
                async with AsyncMilterTestClient(app) as client:
                    assert (await client.send_message(MESSAGE)).verdict == Continue()
            assert (connections, upstream.failures) == (1, 1)
            assert upstream.retry_in() == FIRST_RETRY
            now[0] += FIRST_RETRY
            async with AsyncMilterTestClient(app) as client:
                await client.send_message(MESSAGE)
            assert (connections, upstream.failures) == (2, 2)
            assert upstream.retry_in() == 2 * FIRST_RETRY  # doubled

    run(main())


def test_an_upstream_that_dies_mid_message_fails_closed_for_the_rest_of_the_connection() -> None:
    async def dies_at_rcpt(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        from milterapp.protocol.responses import encode_response

        await negotiated(reader, writer)
        while True:
            letter, _ = await read_packet(reader)
            if letter == "R":
                return  # closes the connection
            if letter in "CHM":
                writer.write(encode_response(Continue()))

    async def main() -> None:
        async with fake_upstream(dies_at_rcpt) as spec:
            app = App("front")
            app.use_milter(spec, name="dying", reuse=False)
            own_stamp(app)
            async with AsyncMilterTestClient(app) as client:
                first = await client.send_message(MESSAGE)
                second = await client.send_message(MESSAGE)
        assert first.recipients == {"recipient@example.net": TempFail()}
        assert first.delivered is None
        assert second.verdict == TempFail()  # at MAIL: it stays failed on this connection
        assert second.stage == "envfrom"

    run(main())


def test_a_slow_end_of_message_times_out_with_progress_to_the_mta() -> None:
    async def main() -> None:
        slow = App("slow")
        released = asyncio.Event()

        @slow.on("eom")
        async def stuck(event: EndOfMessage) -> None:
            await released.wait()  # until the test is over

        async with served(slow) as specs:
            app = App("front", progress_interval=0.05)
            app.use_milter(specs[0], name="slow", eom_timeout=0.5, reuse=False)
            with structlog.testing.capture_logs() as logs:
                async with AsyncMilterTestClient(app) as client:
                    result = await client.send_message(MESSAGE)
            released.set()
        assert result.verdict == TempFail()
        eom = result.replies[-1]
        assert eom.stage == "eom"
        assert eom.answer.progress >= 2  # the MTA heard from us while the upstream worked
        failed = next(entry for entry in logs if entry["event"] == "upstream_failed")
        assert (failed["upstream"], failed["kind"]) == ("slow", "timeout")

    run(main())


def test_a_condition_keeps_an_upstream_out_of_a_message() -> None:
    seen: list[tuple[str, Any]] = []

    async def main() -> None:
        async with served(recorder("spam", seen)) as specs:
            app = App("front")
            app.use_milter(
                specs[0], name="spam", when=lambda ctx: not ctx.macros.get("auth_authen")
            )
            async with AsyncMilterTestClient(app) as client:
                authenticated = await client.send_message(
                    MESSAGE, sender="joe@example.org", macros={"M": {"{auth_authen}": "joe"}}
                )
                anonymous = await client.send_message(MESSAGE, sender="anon@example.org")
            await app.run_shutdown()
        # The only party was out of the first message: done with it, so the MTA is told Accept.
        assert (authenticated.verdict, authenticated.stage) == (Accept(), "envfrom")
        assert anonymous.verdict == Continue()

    run(main())
    assert [what for stage, what in seen if stage == "envfrom"] == ["anon@example.org"]
    assert [stage for stage, _ in seen].count("body") == 1


def test_a_condition_at_connect_keeps_an_upstream_out_of_the_connection() -> None:
    seen: list[tuple[str, Any]] = []

    async def main() -> None:
        async with served(recorder("outbound", seen)) as specs:
            app = App("front")
            app.use_milter(
                specs[0],
                name="outbound",
                when=lambda ctx: not str(ctx.client.address).startswith("192.0.2."),
                when_at="connect",
                reuse=False,
            )
            async with AsyncMilterTestClient(app) as client:
                await client.send_message(MESSAGE)
                await client.send_message(MESSAGE)

    run(main())
    assert seen == []


def test_a_condition_that_raises_applies_the_upstream() -> None:
    seen: list[tuple[str, Any]] = []

    def broken(ctx: Context) -> bool:
        raise RuntimeError("bug in a condition")

    async def main() -> None:
        async with served(recorder("dkim", seen)) as specs:
            app = App("front")
            app.use_milter(specs[0], name="dkim", when=broken, reuse=False)
            with structlog.testing.capture_logs() as logs:
                async with AsyncMilterTestClient(app) as client:
                    await client.send_message(MESSAGE)
        assert any(entry["event"] == "condition_failed" for entry in logs)

    run(main())
    assert ("envfrom", "sender@example.org") in seen


def test_upstream_connections_are_reused_across_mta_connections() -> None:
    sessions: list[str] = []

    async def main() -> None:
        up = App("up")

        @up.on("connect")
        def connected(event: Connect, ctx: Context) -> None:
            sessions.append(ctx.conn_id)

        async with served(up) as specs:
            app = App("front")
            app.use_milter(specs[0], name="up")
            for _ in range(3):
                async with AsyncMilterTestClient(app) as client:
                    await client.send_message(MESSAGE)
            await app.run_shutdown()  # closes the kept connection

    run(main())
    # One connection to the upstream, three sessions on it (QUIT_NC between them).
    assert sessions == ["1", "1.1", "1.2"]


def test_header_values_follow_each_partys_leading_space_choice() -> None:
    spaced: list[str] = []
    plain: list[str] = []

    async def main() -> None:
        with_space = App("spaced", leading_space=True)

        @with_space.on("header")
        def header_a(event: Header) -> None:
            spaced.append(event.value)

        @with_space.on("eom")
        def add_a(event: EndOfMessage, ctx: Context) -> None:
            ctx.add_header("X-Spaced", " written with its space")

        without = App("plain")

        @without.on("header")
        def header_b(event: Header) -> None:
            plain.append(event.value)

        @without.on("eom")
        def add_b(event: EndOfMessage, ctx: Context) -> None:
            ctx.add_header("X-Plain", "written without")

        async with served(with_space, without) as specs:
            app = App("front")
            app.use_milter(specs[0], name="spaced", reuse=False)
            app.use_milter(specs[1], name="plain", reuse=False)
            async with AsyncMilterTestClient(app) as client:
                result = await client.send_message(MESSAGE)
        delivered = result.delivered
        assert delivered is not None
        assert delivered.header("X-Spaced") == "written with its space"
        assert delivered.header("X-Plain") == "written without"

    run(main())
    assert spaced[:3] == [" a@example.org", " b@example.net", " hi"]
    assert plain[:3] == ["a@example.org", "b@example.net", "hi"]
    assert plain[3] == "written with its space"  # the first one's header, as the MTA shows it


def test_envelope_edits_and_quarantine_of_upstreams_reach_the_mta() -> None:
    def edits(event: EndOfMessage, ctx: Context) -> Accept:
        ctx.add_recipient("copy@example.net")
        ctx.delete_recipient("recipient@example.net")
        ctx.change_sender("bounces@example.org")
        ctx.quarantine("held by one")
        return Accept()

    async def main() -> None:
        async with served(recorder("one", [], eom=edits), recorder("two", [])) as specs:
            app = App("front")
            for at, spec in enumerate(specs):
                app.use_milter(spec, name=f"up{at}", reuse=False)
            own_stamp(app)
            async with AsyncMilterTestClient(app) as client:
                result = await client.send_message(MESSAGE)
        delivered = result.delivered
        assert delivered is not None
        assert delivered.recipients == ("copy@example.net",)
        assert delivered.sender == "bounces@example.org"
        assert delivered.quarantine == "held by one"
        assert isinstance(result.modifications[-1], Quarantine)  # just before the verdict

    run(main())


def test_upstream_failures_are_counted_by_name_and_kind() -> None:
    from prometheus_client import CollectorRegistry

    from milterapp.server.metrics import Metrics

    async def main() -> float:
        metrics = Metrics(CollectorRegistry())
        app = App("front")
        app.use_milter(nowhere(), name="gone", on_failure="accept")
        own_stamp(app)
        async with (
            serving(app, metrics=metrics) as spec,
            AsyncMilterTestClient(target=spec) as client,
        ):
            await client.send_message(MESSAGE)
        return metrics.registry.get_sample_value(
            "milterapp_upstream_failures_total", {"upstream": "gone", "kind": "unreachable"}
        )

    assert run(main()) == 1


@pytest.mark.parametrize(("verdict", "sessions"), [(None, ["1", "1.1"]), (Accept(), ["1", "2"])])
def test_only_a_connection_whose_message_ended_with_continue_is_reused(
    verdict: Any, sessions: list[str]
) -> None:
    """libmilter takes QUIT_NC only right after an end of message it answered Continue."""
    seen: list[str] = []

    async def main() -> None:
        up = App("up")

        @up.on("connect")
        def connected(event: Connect, ctx: Context) -> None:
            seen.append(ctx.conn_id)

        @up.on("eom")
        def end(event: EndOfMessage) -> Any:
            return verdict

        async with served(up) as specs:
            app = App("front")
            app.use_milter(specs[0], name="up")
            for _ in range(2):
                async with AsyncMilterTestClient(app) as client:
                    await client.send_message(MESSAGE)
            await app.run_shutdown()

    run(main())
    assert seen == sessions


def test_a_failed_upstream_with_a_condition_answers_only_where_it_applies() -> None:
    async def main() -> None:
        app = App("front")
        app.use_milter(
            nowhere(),
            name="signer",
            when=lambda ctx: ctx.helo != "nosign.example",
            when_at="helo",
        )
        own_stamp(app)
        async with AsyncMilterTestClient(app) as client:
            exempt = await client.send_message(MESSAGE, helo="nosign.example")
        async with AsyncMilterTestClient(app) as client:
            applies = await client.send_message(MESSAGE, helo="mail.example")
        assert exempt.verdict == Continue()
        assert exempt.delivered is not None
        assert (applies.verdict, applies.stage) == (TempFail(), "helo")

    run(main())


def test_an_upstream_deciding_before_end_of_message_is_connected_again_for_the_next() -> None:
    """The content is pipelined: an upstream that refuses at a header was sent the rest, so
    its connection is given up and a new one opened, brought to HELO, for the next message."""
    seen: list[tuple[str, Any]] = []
    sessions: list[str] = []

    def refuse_spam(event: Header, ctx: Context) -> Reject | None:
        return Reject(text="spam header") if event.value == "spam" else None

    async def main() -> None:
        up = recorder("up", seen, header=refuse_spam)

        @up.on("helo")
        def greeted(event: Any, ctx: Context) -> None:
            sessions.append(ctx.conn_id)

        async with served(up) as specs:
            app = App("front")
            app.use_milter(specs[0], name="up", reuse=False)
            async with AsyncMilterTestClient(app) as client:
                refused = await client.send_message(
                    MESSAGE.replace(b"Subject: hi", b"Subject: spam")
                )
                passed = await client.send_message(MESSAGE)
        assert (refused.verdict, refused.stage) == (Reject(text="spam header"), "eom")
        assert passed.verdict == Continue()
        assert passed.delivered is not None

    run(main())
    assert sessions == ["1", "2"]  # a new connection, given CONNECT and HELO again
    assert [what for stage, what in seen if stage == "envfrom"] == ["sender@example.org"] * 2


def test_an_upstream_that_skips_the_body_is_not_sent_the_rest_of_it() -> None:
    chunks: list[int] = []
    ends: list[int] = []

    async def main() -> None:
        skipping = App("skipping")

        @skipping.on("body")
        def body(event: Any) -> Any:
            from milterapp.replies import Skip

            chunks.append(len(event.chunk))
            return Skip()

        @skipping.on("eom")
        def eom(event: EndOfMessage, ctx: Context) -> None:
            ends.append(1)
            ctx.add_header("X-Skipped", "yes")

        async with served(skipping) as specs:
            app = App("front")
            app.use_milter(specs[0], name="skipping", reuse=False)
            with structlog.testing.capture_logs() as logs:
                async with AsyncMilterTestClient(app) as client:
                    result = await client.send_message(MESSAGE + b"y" * 200_000)
        assert not [entry for entry in logs if entry["event"] == "upstream_failed"]
        assert result.delivered is not None
        assert result.delivered.header("X-Skipped") == "yes"

    run(main())
    assert len(chunks) == 1  # the first chunk only: the rest was not sent
    assert ends == [1]
