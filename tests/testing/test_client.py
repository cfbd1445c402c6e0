"""The in-memory MTA client: whole messages through an App as Postfix or Sendmail sends them."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest

from milterapp import (
    Accept,
    App,
    Body,
    Connect,
    Context,
    Continue,
    EndOfMessage,
    EnvFrom,
    EnvRcpt,
    Header,
    Helo,
    Reject,
    Shutdown,
    TempFail,
)
from milterapp.testing.client import AsyncMilterTestClient, MessageResult, MilterTestClient
from milterapp.testing.sockets import ServerThread, serving

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


@pytest.mark.parametrize("where", ["inet", "unix"])
def test_a_served_app_is_reached_at_its_bound_spec(where: str, sock_dir: Path) -> None:
    spec = "inet:0@[127.0.0.1]" if where == "inet" else f"unix:{sock_dir}/stamp.sock"

    async def exchange(target: str) -> bool:
        async with AsyncMilterTestClient(target=target) as client:
            result = await client.send_message(MESSAGE)
        return result.delivered is not None and result.delivered.header("X-Stamp") == "1"

    async def in_this_loop() -> None:
        async with serving(stamping_app(), spec) as bound:
            assert bound.startswith(where + ":")
            assert ":0@" not in bound  # the port the system chose
            assert await exchange(bound)

    asyncio.run(asyncio.wait_for(in_this_loop(), 20))
    with ServerThread(stamping_app(), spec) as server:
        assert asyncio.run(asyncio.wait_for(exchange(server.spec), 20))


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


# --- arguments as a person types them -------------------------------------------------------


def recipients_app() -> tuple[App, list[str]]:
    app = App("recipients")
    seen: list[str] = []

    @app.on("envrcpt")
    def rcpt(event: EnvRcpt) -> None:
        seen.append(event.address)

    return app, seen


def test_one_recipient_may_be_given_as_a_str() -> None:
    app, seen = recipients_app()
    with MilterTestClient(app) as client:
        result = client.send_message(MESSAGE, recipients="bob@example.net")
    assert seen == ["bob@example.net"]  # not one recipient per character
    assert result.recipients == {"bob@example.net": Continue()}
    assert result.delivered is not None
    assert result.delivered.recipients == ("bob@example.net",)


def test_recipients_may_be_any_iterable_of_str() -> None:
    app, seen = recipients_app()
    with MilterTestClient(app) as client:
        client.send_message(MESSAGE, recipients=(r for r in ["a@example.net", "b@example.net"]))
    assert seen == ["a@example.net", "b@example.net"]


@pytest.mark.parametrize("recipients", [[], (), "", ["a@example.net", ""]])
def test_no_recipient_is_a_clear_error(recipients: list[str] | tuple[str, ...] | str) -> None:
    app, seen = recipients_app()
    with MilterTestClient(app) as client:
        with pytest.raises(ValueError, match="needs at least one recipient"):
            client.send_message(MESSAGE, recipients=recipients)
        assert client.send_message(MESSAGE).accepted  # nothing was sent: the client goes on
    assert seen == ["recipient@example.net"]


def test_mail_args_may_be_written_as_on_the_mail_from_line() -> None:
    app = App("mail-args")
    seen: list[list[str]] = []

    @app.on("envfrom")
    def mail(event: EnvFrom) -> None:
        seen.append(event.args.as_strings())

    with MilterTestClient(app) as client:
        client.send_message(MESSAGE, mail_args="SIZE=1024 BODY=8BITMIME")
        client.send_message(MESSAGE, mail_args=["SMTPUTF8"])
        with pytest.raises(ValueError, match="ESMTP parameter"):
            client.send_message(MESSAGE, mail_args=["SIZE=1 BODY=7BIT"])
    assert seen == [["SIZE=1024", "BODY=8BITMIME"], ["SMTPUTF8"]]


def connection_app() -> tuple[App, list[tuple[str, str]]]:
    app = App("connection")
    seen: list[tuple[str, str]] = []

    @app.on("connect")
    def connect(event: Connect) -> None:
        seen.append(("connect", f"{event.hostname} {event.address}"))

    @app.on("helo")
    def helo(event: Helo) -> None:
        seen.append(("helo", event.name))

    return app, seen


def test_send_message_connects_with_the_connection_details_given() -> None:
    app, seen = connection_app()
    with MilterTestClient(app) as client:
        client.send_message(
            MESSAGE, client_address="203.0.113.9", client_name="mail.example.com", helo="mail"
        )
        # The same details again are fine: they describe the connection already open.
        client.send_message(MESSAGE, client_address="203.0.113.9", helo="mail")
        assert client.facts.client_address == "203.0.113.9"
    assert seen == [("connect", "mail.example.com 203.0.113.9"), ("helo", "mail")]


def test_other_connection_details_once_connected_are_a_clear_error() -> None:
    app, seen = connection_app()
    with MilterTestClient(app) as client:
        client.connect(client_address="192.0.2.7")
        with pytest.raises(ValueError, match=r"send_message\(helo='other'\).*already connected"):
            client.send_message(MESSAGE, client_address="192.0.2.7", helo="other")
        assert client.send_message(MESSAGE).accepted  # nothing was sent: the client goes on
    assert seen == [("connect", "client.example 192.0.2.7"), ("helo", "client.example")]


def test_connect_twice_is_a_clear_error() -> None:
    app, seen = connection_app()
    with MilterTestClient(app) as client:
        before = client.connected
        client.send_message(MESSAGE)
        assert (before, client.connected) == (False, True)
        with pytest.raises(RuntimeError, match=r"already connected.*use a new client"):
            client.connect(client_address="198.51.100.1")
        assert client.send_message(MESSAGE).accepted
    assert [stage for stage, _ in seen] == ["connect", "helo"]


def test_async_send_message_takes_the_connection_details_and_one_recipient() -> None:
    app, seen = connection_app()

    async def exchange() -> MessageResult:
        async with AsyncMilterTestClient(app) as client:
            return await client.send_message(
                MESSAGE, recipients="bob@example.net", client_address="2001:db8::7"
            )

    result = asyncio.run(exchange())
    assert list(result.recipients) == ["bob@example.net"]
    assert seen[0] == ("connect", "client.example 2001:db8::7")


UNKNOWN_OPTIONS: list[tuple[str, Callable[[Any], object], str, str]] = [
    ("__init__", lambda cls: cls(stamping_app(), mtaa="postfix"), "mtaa", "mta"),
    ("connect", lambda client: client.connect(hello="x"), "hello", "helo"),
    (
        "send_message",
        lambda client: client.send_message(MESSAGE, recipient="b@example.net"),
        "recipient",
        "recipients",
    ),
]


@pytest.mark.parametrize("client_class", [MilterTestClient, AsyncMilterTestClient])
@pytest.mark.parametrize(
    ("method", "call", "wrong", "meant"), UNKNOWN_OPTIONS, ids=[u[0] for u in UNKNOWN_OPTIONS]
)
def test_an_unknown_option_is_named_with_the_valid_ones(
    client_class: type[MilterTestClient] | type[AsyncMilterTestClient],
    method: str,
    call: Callable[[Any], object],
    wrong: str,
    meant: str,
) -> None:
    signature = inspect.signature(getattr(client_class, method))
    valid = [name for name in signature.parameters if name != "self"]
    if method == "__init__":
        subject: Any = client_class
        where = f"{client_class.__name__}()"
    else:
        subject = client_class(stamping_app())
        where = f"{client_class.__name__}.{method}()"
    with pytest.raises(TypeError) as caught:
        call(subject)  # an async method refuses at the call, before anything is awaited
    message = str(caught.value)
    assert message.startswith(f"{where} got an unknown option {wrong!r}")
    assert f"did you mean {meant!r}?" in message
    assert message.endswith(f"its options are: {', '.join(valid)}")
    if isinstance(subject, MilterTestClient):
        subject.close()


@pytest.mark.parametrize("method", ["__init__", "connect", "send_message"])
def test_the_sync_client_takes_the_same_arguments_as_the_async_one(method: str) -> None:
    def parameters(cls: type) -> list[tuple[str, object, object, object]]:
        signature = inspect.signature(getattr(cls, method))
        return [(p.name, p.kind, p.default, p.annotation) for p in signature.parameters.values()]

    assert parameters(MilterTestClient) == parameters(AsyncMilterTestClient)


# --- verdicts that end the milter's part in the connection ----------------------------------


def gatekeeper_app() -> tuple[App, list[str]]:
    app = App("gatekeeper")
    seen: list[str] = []

    @app.on("connect")
    def connect(event: Connect) -> Reject | Accept | None:
        seen.append("connect")
        if event.hostname.startswith("dyn-"):
            return Reject(code=550, xcode="5.7.1", text="dynamic address")
        if event.hostname == "trusted.example":
            return Accept()
        return None

    @app.on("helo")
    def helo(event: Helo) -> TempFail | None:
        seen.append("helo")
        return TempFail(code=421, text="go away") if event.name == "localhost" else None

    @app.on("envfrom")
    def mail(event: EnvFrom) -> Shutdown | None:
        seen.append("envfrom")
        return Shutdown() if event.address == "shutdown@example.org" else None

    @app.on("eom")
    def stamp(event: EndOfMessage, ctx: Context) -> None:
        ctx.add_header("X-Stamp", "1")

    return app, seen


def test_a_refusal_at_connect_decides_every_message_of_the_connection() -> None:
    app, seen = gatekeeper_app()
    with MilterTestClient(app) as client:
        first = client.send_message(MESSAGE, client_name="dyn-192-0-2-7.example.net")
        second = client.send_message(MESSAGE)
    refusal = Reject(code=550, xcode="5.7.1", text="dynamic address")
    for result in (first, second):
        assert result.rejected
        assert (result.verdict, result.stage) == (refusal, "connect")
        assert result.recipients == {}
        assert result.delivered is None
        reply = result.reply("connect")
        assert reply is not None
        assert reply.verdict == refusal
    assert seen == ["connect"]  # no HELO, nothing more for the milter


def test_connect_stops_at_a_connection_level_verdict() -> None:
    app, seen = gatekeeper_app()
    with MilterTestClient(app) as client:
        answers = client.connect(helo="localhost")
        result = client.send_message(MESSAGE)
    assert [answer.verdict for answer in answers] == [
        Continue(),
        TempFail(code=421, text="go away"),
    ]
    assert result.tempfailed
    assert result.stage == "helo"
    assert seen == ["connect", "helo"]


def test_accept_at_connect_delivers_every_message_unchanged() -> None:
    app, seen = gatekeeper_app()
    with MilterTestClient(app) as client:
        result = client.send_message(
            MESSAGE, client_name="trusted.example", recipients=["a@example.net", "b@example.net"]
        )
    assert result.accepted
    assert result.stage == "connect"
    assert result.recipients == {"a@example.net": Continue(), "b@example.net": Continue()}
    assert result.delivered is not None
    assert result.delivered.recipients == ("a@example.net", "b@example.net")
    assert result.delivered.header("X-Stamp") is None
    assert seen == ["connect"]


def test_after_a_shutdown_later_messages_get_it_too() -> None:
    app, seen = gatekeeper_app()
    with MilterTestClient(app) as client:
        first = client.send_message(MESSAGE, sender="shutdown@example.org")
        second = client.send_message(MESSAGE)
    assert (first.verdict, first.stage) == (Shutdown(), "envfrom")
    assert (second.verdict, second.stage) == (Shutdown(), "envfrom")
    assert second.tempfailed
    assert seen == ["connect", "helo", "envfrom"]


def test_the_body_goes_in_chunks_of_the_size_asked() -> None:
    app = App("chunks")
    seen: list[bytes] = []

    @app.on("body")
    def chunk(event: Body) -> None:
        seen.append(event.chunk)

    message = b"Subject: s\r\n\r\n0123456789"
    with MilterTestClient(app) as client:
        client.send_message(message)
        whole = list(seen)
        seen.clear()
        delivered = client.send_message(message, body_chunk_size=4).delivered
        for size in (0, 65536):
            with pytest.raises(ValueError, match="body_chunk_size: must be 1 to 65535 bytes"):
                client.send_message(message, body_chunk_size=size)
    # (The kit ends the body with CRLF, as the MTAs' DATA does.)
    assert whole == [b"0123456789\r\n"]
    assert seen == [b"0123", b"4567", b"89\r\n"]
    assert delivered is not None
    assert delivered.body == b"0123456789\r\n"
