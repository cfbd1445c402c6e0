"""What the context promises is there, whatever handlers the app has (issue 14).

Each test drives a whole message through the testing kit, as Postfix sends it, so that the
negotiation (which events the MTA is asked for) is part of what is tested.
"""

from __future__ import annotations

import pytest
import structlog.testing

from milterapp import (
    App,
    Context,
    Continue,
    EndOfMessage,
    EnvRcpt,
    NotAvailable,
    Reject,
    TempFail,
)
from milterapp.testing import MilterTestClient

MESSAGE = b"From: alice@example.org\r\nSubject: hi\r\n\r\nHello.\r\n"
RECIPIENTS = [f"r{n}@example.net" for n in range(1, 6)]


def test_the_obvious_script_works_without_a_connect_handler() -> None:
    # The script of issue 14: no connect, helo or envfrom handler, and end of message reads
    # the client, the HELO name and the sender. It used to tempfail every message.
    app = App("obvious")

    @app.on("eom")
    def stamp(event: EndOfMessage, ctx: Context) -> None:
        ctx.add_header("X-Client", f"{ctx.helo} [{ctx.client.address}]")
        ctx.add_header("X-Sender", ctx.message.sender.address)
        ctx.add_header("X-Recipients", str(len(ctx.message.recipients)))

    with MilterTestClient(app) as client:
        client.connect(client_address="192.0.2.7", helo="mx.example.org")
        result = client.send_message(MESSAGE, sender="alice@example.org", recipients=RECIPIENTS)
    assert result.accepted, result
    assert result.delivered is not None
    assert result.delivered.header("X-Client") == "mx.example.org [192.0.2.7]"
    assert result.delivered.header("X-Sender") == "alice@example.org"
    assert result.delivered.header("X-Recipients") == "5"


def test_unhandled_recorded_events_are_asked_without_replies() -> None:
    app = App("eom-only")

    @app.on("eom")
    def nothing(event: EndOfMessage) -> None:
        return None

    with MilterTestClient(app) as client:
        result = client.send_message(MESSAGE, recipients=RECIPIENTS[:2])
        options = client.mta.options
    assert result.accepted
    assert options is not None
    for name in ("connect", "helo", "envfrom", "envrcpt"):
        assert not options.suppressed(name)  # type: ignore[arg-type]
    # Only end of message got a reply: the MTA did not wait for the others.
    assert [reply.stage for reply in result.replies] == ["eom"]


def limited_app(limit: int) -> tuple[App, list[int], list[list[str]]]:
    app = App("limit")
    seen_counts: list[int] = []
    at_eom: list[list[str]] = []

    @app.on("envrcpt")
    def at_most(event: EnvRcpt, ctx: Context) -> TempFail | None:
        seen_counts.append(len(ctx.message.recipients))
        if len(ctx.message.recipients) >= limit:
            return TempFail(code=452, xcode="4.5.3", text="too many recipients")
        return None

    @app.on("eom")
    def record(event: EndOfMessage, ctx: Context) -> None:
        at_eom.append([rcpt.address for rcpt in ctx.message.recipients])

    return app, seen_counts, at_eom


def test_recipients_in_envrcpt_are_those_accepted_before_this_one() -> None:
    # A limit of 3 used to let only 2 through: the list already held the one being checked.
    app, seen_counts, at_eom = limited_app(3)
    with MilterTestClient(app) as client:
        result = client.send_message(MESSAGE, recipients=RECIPIENTS)
    assert seen_counts == [0, 1, 2, 3, 3]
    accepted = [rcpt for rcpt, verdict in result.recipients.items() if verdict == Continue()]
    assert accepted == RECIPIENTS[:3]
    assert at_eom == [RECIPIENTS[:3]]  # the refused ones are not in the list


def test_async_envrcpt_handlers_see_the_same() -> None:
    app = App("async-limit")
    at_eom: list[list[str]] = []

    @app.on("envrcpt")
    async def refuse_second(event: EnvRcpt, ctx: Context) -> Reject | None:
        if event.address == RECIPIENTS[1]:
            return Reject(code=550, xcode="5.1.1", text="no such user")
        return None

    @app.on("eom")
    def record(event: EndOfMessage, ctx: Context) -> None:
        at_eom.append([rcpt.address for rcpt in ctx.message.recipients])

    with MilterTestClient(app) as client:
        client.send_message(MESSAGE, recipients=RECIPIENTS[:3])
    assert at_eom == [[RECIPIENTS[0], RECIPIENTS[2]]]


def test_recipients_without_an_envrcpt_handler_are_all_there() -> None:
    app = App("count")
    counts: list[int] = []

    @app.on("eom")
    def record(event: EndOfMessage, ctx: Context) -> None:
        counts.append(len(ctx.message.recipients))

    with MilterTestClient(app) as client:
        client.send_message(MESSAGE, recipients=RECIPIENTS)
        client.send_message(MESSAGE, recipients=RECIPIENTS[:1])
    assert counts == [5, 1]  # a fresh list per message


def test_the_client_read_too_early_says_when_it_is_known() -> None:
    app = App("early")
    errors: list[Exception] = []

    @app.on("open")
    def too_early(event: object, ctx: Context) -> None:
        try:
            _ = ctx.client
        except NotAvailable as exc:
            errors.append(exc)

    with MilterTestClient(app) as client:
        assert client.send_message(MESSAGE).accepted
    assert len(errors) == 1
    assert "connect" in str(errors[0])


def test_the_body_not_kept_fails_the_handler_with_the_fix_in_the_log() -> None:
    app = App("no-body")

    @app.on("eom")
    def parse(event: EndOfMessage, ctx: Context) -> None:
        ctx.message.as_email()

    with (
        structlog.testing.capture_logs() as logs,
        MilterTestClient(app, raise_errors=False) as client,
    ):
        result = client.send_message(MESSAGE)
    assert result.tempfailed  # fail closed, never an empty message parsed as if whole
    failures = [entry for entry in logs if entry["event"] == "handler_failed"]
    assert failures
    assert "keep_message=True" in str(failures[0]["exc_info"])


def test_the_body_not_kept_raises_in_tests_with_the_fix() -> None:
    app = App("no-body")

    @app.on("eom")
    def parse(event: EndOfMessage, ctx: Context) -> None:
        ctx.message.body_bytes()

    with MilterTestClient(app) as client, pytest.raises(NotAvailable, match="keep_message=True"):
        client.send_message(MESSAGE)


def test_headers_are_there_with_a_header_handler_only() -> None:
    app = App("headers")
    names: list[list[str]] = []

    @app.on("header")
    def nothing(event: object) -> None:
        return None

    @app.on("eom")
    def record(event: EndOfMessage, ctx: Context) -> None:
        names.append([header.name for header in ctx.message.headers])

    with MilterTestClient(app) as client:
        client.send_message(MESSAGE)
    assert names == [["From", "Subject"]]


# --- told at start-up -------------------------------------------------------------------


def test_setup_warnings_name_the_handler_and_the_fix() -> None:
    app = App("reads")

    @app.on("eom")
    def parse(event: EndOfMessage, ctx: Context) -> None:
        ctx.message.as_email()
        for _header in ctx.message.headers:
            pass

    @app.on("open")
    def early(event: object, ctx: Context) -> None:
        print(ctx.client)

    warnings = app.setup_warnings()
    assert any("parse" in w and "as_email()" in w and "keep_message=True" in w for w in warnings)
    assert any("ctx.message.headers" in w and "'header' handler" in w for w in warnings)
    assert any("early" in w and "ctx.client" in w for w in warnings)
    assert len(warnings) == 3


def test_no_setup_warnings_when_the_app_keeps_what_it_reads() -> None:
    app = App("keeps", keep_message=True)

    @app.on("eom")
    def parse(event: EndOfMessage, ctx: Context) -> None:
        ctx.message.as_email()
        ctx.message.body()
        _ = ctx.message.headers
        _ = ctx.client

    assert app.setup_warnings() == []


def test_setup_warnings_are_logged_when_the_app_starts() -> None:
    app = App("reads")

    @app.on("eom")
    def parse(event: EndOfMessage, ctx: Context) -> None:
        ctx.message.body_bytes()

    with structlog.testing.capture_logs() as logs, MilterTestClient(app):
        pass
    warnings = [entry for entry in logs if entry["event"] == "setup_warning"]
    assert len(warnings) == 1
    assert "body_bytes()" in warnings[0]["warning"]
    assert warnings[0]["log_level"] == "warning"
