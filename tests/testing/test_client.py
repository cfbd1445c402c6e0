"""The in-memory MTA client: whole messages through an App as Postfix or Sendmail sends them."""

from __future__ import annotations

import asyncio
from email.message import EmailMessage

import pytest

from milterapp import (
    Accept,
    App,
    Body,
    Context,
    Continue,
    EndOfMessage,
    EnvFrom,
    EnvRcpt,
    Header,
    Reject,
    TempFail,
)
from milterapp.testing.client import AsyncMilterTestClient, MilterTestClient
from milterapp.testing.sockets import ServerThread

MESSAGE = b"From: a@example.org\r\nSubject: hello\r\nX-Long: one\r\n two\r\n\r\nBody line.\r\n"


def stamping_app() -> App:
    app = App("stamp")

    @app.on("eom")
    def stamp(event: EndOfMessage, ctx: Context) -> None:
        ctx.add_header("X-Stamp", "1")
        ctx.change_header("Subject", "changed")

    return app


def test_client_delivers_with_modifications_applied() -> None:
    with MilterTestClient(stamping_app()) as client:
        result = client.send_message(MESSAGE, sender="a@example.org", recipients=["b@example.net"])
    assert result.accepted
    assert result.stage == "eom"
    assert result.delivered is not None
    assert result.delivered.header("X-Stamp") == "1"
    assert result.delivered.header("Subject") == "changed"
    assert result.delivered.header("X-Long") == "one\n two"
    assert result.delivered.body == b"Body line.\r\n"
    assert result.delivered.recipients == ("b@example.net",)


def test_client_sees_events_as_the_mta_sends_them() -> None:
    app = App("observe")
    seen: list[object] = []

    @app.on("envfrom")
    def mail(event: EnvFrom, ctx: Context) -> None:
        seen.append(("mail", event.address, ctx.client.address if ctx.client else None))

    @app.on("header")
    def header(event: Header) -> None:
        seen.append(("header", event.name, event.value))

    @app.on("body")
    def body(event: Body) -> None:
        seen.append(("body", event.chunk))

    @app.on("eom")
    def eom(event: EndOfMessage, ctx: Context) -> None:
        seen.append(("eom", ctx.message.queue_id is not None, ctx.macros.get("j")))

    with MilterTestClient(app) as client:
        client.send_message(MESSAGE, sender="a@example.org")
    assert seen[0][:2] == ("mail", "a@example.org")
    assert ("header", "Subject", "hello") in seen  # the MTA removed the space after the colon
    assert ("header", "X-Long", "one\n two") in seen
    assert ("body", b"Body line.\r\n") in seen
    assert seen[-1] == ("eom", True, "mx.example.net")


def test_client_reports_refusal_stage_and_per_recipient_verdicts() -> None:
    app = App("refuse")

    @app.on("envrcpt")
    def rcpt(event: EnvRcpt) -> TempFail | None:
        return TempFail() if event.address.startswith("busy") else None

    @app.on("envfrom")
    def mail(event: EnvFrom) -> Reject | None:
        return Reject(code=550, text="no") if event.domain == "spam.example" else None

    with MilterTestClient(app) as client:
        refused = client.send_message(MESSAGE, sender="x@spam.example")
        partly = client.send_message(MESSAGE, recipients=["busy@example.net", "ok@example.net"])
    assert refused.rejected
    assert refused.stage == "envfrom"
    assert refused.delivered is None
    assert partly.accepted
    assert partly.recipients["busy@example.net"] == TempFail()
    assert partly.recipients["ok@example.net"] == Continue()
    assert partly.delivered is not None
    assert partly.delivered.recipients == ("ok@example.net",)


def test_client_accept_at_mail_skips_the_rest() -> None:
    app = App("accept")

    @app.on("envfrom")
    def mail(event: EnvFrom) -> Accept:
        return Accept()

    @app.on("eom")
    def never(event: EndOfMessage, ctx: Context) -> None:
        ctx.add_header("X-Never", "1")

    with MilterTestClient(app) as client:
        result = client.send_message(MESSAGE)
    assert result.accepted
    assert result.stage == "envfrom"
    assert result.delivered is not None
    assert result.delivered.header("X-Never") is None


def test_client_reraises_handler_errors_by_default() -> None:
    app = App("buggy")

    @app.on("eom")
    def broken(event: EndOfMessage) -> None:
        raise ZeroDivisionError("bug")

    client = MilterTestClient(app)
    with pytest.raises(ZeroDivisionError, match="bug"):
        client.send_message(MESSAGE)
    client.close()


def test_client_without_raise_errors_sees_the_fallback() -> None:
    app = App("buggy")

    @app.on("eom")
    def broken(event: EndOfMessage) -> None:
        raise ZeroDivisionError("bug")

    with MilterTestClient(app, raise_errors=False) as client:
        result = client.send_message(MESSAGE)
        again = client.send_message(MESSAGE)
    assert result.tempfailed
    assert again.tempfailed  # the connection goes on


def test_client_accepts_email_message_objects_and_sendmail_profile() -> None:
    message = EmailMessage()
    message["From"] = "a@example.org"
    message["Subject"] = "object"
    message.set_content("text\n")
    with MilterTestClient(stamping_app(), mta="sendmail") as client:
        result = client.send_message(message)
    assert result.delivered is not None
    assert result.delivered.header("Subject") == "changed"


def test_async_client_against_a_server_over_a_socket() -> None:
    async def exchange(address: tuple[str, int]) -> bool:
        async with AsyncMilterTestClient(target=address) as client:
            result = await client.send_message(MESSAGE)
        return result.delivered is not None and result.delivered.header("X-Stamp") == "1"

    with ServerThread(stamping_app(), "inet:0@[127.0.0.1]") as server:
        assert asyncio.run(asyncio.wait_for(exchange(server.address), 20))


def test_client_needs_exactly_one_of_app_or_target() -> None:
    with pytest.raises(ValueError, match="either an App"):
        AsyncMilterTestClient()


def test_client_sends_the_macros_the_app_asked_for() -> None:
    app = App("macros", macros={"envfrom": ["{client_addr}"]})
    seen: list[str | None] = []

    @app.on("envfrom")
    def mail(event: EnvFrom, ctx: Context) -> None:
        seen.append(ctx.macros.get("client_addr"))

    with MilterTestClient(app) as client:
        client.connect(client_address="198.51.100.7")
        client.send_message(MESSAGE)
    assert seen == ["198.51.100.7"]


def test_client_queue_id_timing_follows_the_mta() -> None:
    def recorder() -> tuple[App, list[tuple[str, str | None]]]:
        app = App("queue-id")
        seen: list[tuple[str, str | None]] = []

        @app.on("envfrom")
        def mail(event: EnvFrom, ctx: Context) -> None:
            seen.append(("mail", ctx.macros.get("i")))

        @app.on("envrcpt")
        def rcpt(event: EnvRcpt, ctx: Context) -> None:
            seen.append(("rcpt", ctx.macros.get("i")))

        return app, seen

    postfix_app, postfix_seen = recorder()
    with MilterTestClient(postfix_app) as client:
        client.send_message(MESSAGE, recipients=["a@example.net", "b@example.net"])
    sendmail_app, sendmail_seen = recorder()
    with MilterTestClient(sendmail_app, mta="sendmail") as client:
        client.send_message(MESSAGE, recipients=["a@example.net"])
    # Postfix: no queue id at MAIL and the first RCPT, then it is known.
    assert [value is not None for _, value in postfix_seen] == [False, False, True]
    # Sendmail: known from MAIL on.
    assert all(value is not None for _, value in sendmail_seen)


def test_client_per_message_macros_do_not_leak_into_the_next_message() -> None:
    app = App("leak")
    seen: list[str | None] = []

    @app.on("envfrom")
    def mail(event: EnvFrom, ctx: Context) -> None:
        seen.append(ctx.macros.get("{auth_authen}"))

    with MilterTestClient(app) as client:
        client.send_message(MESSAGE, macros={"M": {"{auth_authen}": "alice"}})
        client.send_message(MESSAGE)
    assert seen == ["alice", None]
