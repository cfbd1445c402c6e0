"""What ctx.message keeps of refused recipients, and Skip when it cannot be passed on."""

from __future__ import annotations

import pytest

from milterapp import App, Body, Context, EndOfMessage, EnvRcpt, Reject, Skip, TempFail
from milterapp.events import Data, EndOfHeaders, EnvFrom, Event, Macros
from tests.server.support import (
    CLIENT,
    HELO,
    connect,
    run,
    running_server,
    send,
    send_message,
    start_session,
)


def test_refused_recipients_are_not_kept_in_the_message() -> None:
    app = App("rcpt")
    seen: list[list[str]] = []

    @app.on("envrcpt")
    def refuse_some(event: EnvRcpt) -> Reject | TempFail | None:
        if event.address.startswith("no"):
            return Reject(code=550, text="no such user")
        if event.address.startswith("later"):
            return TempFail()
        return None

    @app.on("eom")
    def record(event: EndOfMessage, ctx: Context) -> None:
        seen.append([rcpt.address for rcpt in ctx.message.recipients])

    async def main() -> None:
        async with running_server(app) as server:
            client = await connect(server)
            async with client:
                await start_session(client)
                recipients = ["a@x.example", "no@x.example", "later@x.example", "b@x.example"]
                await send_message(client, recipients=recipients)

    run(main())
    assert seen == [["a@x.example", "b@x.example"]]


def test_skip_is_continue_when_keep_message_needs_the_body() -> None:
    app = App("keep", keep_message=True)
    bodies: list[bytes] = []

    @app.on("body")
    def skip(event: Body) -> Skip:
        return Skip()

    @app.on("eom")
    def record(event: EndOfMessage, ctx: Context) -> None:
        bodies.append(ctx.message.body_bytes())

    @app.on("envfrom")
    def nothing(event: EnvFrom) -> None:
        return None

    async def main() -> None:
        async with running_server(app) as server:
            client = await connect(server)
            async with client:
                await start_session(client)
                reply = client.mta.options
                assert reply is not None
                assert not reply.protocol & reply.protocol.SKIP  # not asked for
                await send_message(client, body=b"whole body\r\n")

    run(main())
    assert bodies == [b"whole body\r\n"]


def rejected_by_mta_events(address: str) -> list[Event]:
    """A RCPT the MTA refused itself, as Postfix shows it to a milter that asked (RCPT_REJ)."""
    return [
        Macros(
            stage="R",
            values={"{rcpt_mailer}": "error", "{rcpt_host}": "5.1.1", "{rcpt_addr}": "no"},
        ),
        EnvRcpt(address=address),
    ]


@pytest.mark.parametrize("handled", [False, True], ids=["kept-for-the-context", "handled"])
def test_recipients_the_mta_refused_are_not_kept(handled: bool) -> None:
    app = App("rcpt-rej", rejected_recipients=True)
    seen: list[list[str]] = []
    if handled:

        @app.on("envrcpt")
        def look(event: EnvRcpt) -> None:
            return None

    @app.on("eom")
    def record(event: EndOfMessage, ctx: Context) -> None:
        seen.append([rcpt.address for rcpt in ctx.message.recipients])

    async def main() -> None:
        async with running_server(app) as server, await connect(server) as client:
            await start_session(client)
            events = [
                Macros(stage="M", values={}),
                EnvFrom(address="a@x.example"),
                Macros(stage="R", values={"{rcpt_mailer}": "local"}),
                EnvRcpt(address="ok@x.example"),
                *rejected_by_mta_events("unknown@x.example"),
                Macros(stage="R", values={"{rcpt_mailer}": "local"}),
                EnvRcpt(address="ok2@x.example"),
                Data(),
                EndOfHeaders(),
            ]
            for event in events:
                await send(client, event)
            answer = await client.send(EndOfMessage())
            assert answer is not None

    run(main())
    assert seen == [["ok@x.example", "ok2@x.example"]]


def test_undecoded_envelope_is_decoded_when_read() -> None:
    # No handler reads MAIL, RCPT, CONNECT or HELO as they come: the server keeps their
    # payloads, and the context decodes them at end of message.
    app = App("lazy")
    seen: list[object] = []

    @app.on("eom")
    def record(event: EndOfMessage, ctx: Context) -> None:
        seen.append(
            (
                str(ctx.client.address),
                ctx.client.hostname,
                ctx.helo,
                ctx.message.sender.address,
                ctx.message.sender.args.get("SIZE"),
                [rcpt.address for rcpt in ctx.message.recipients],
            )
        )

    async def main() -> None:
        async with running_server(app) as server, await connect(server) as client:
            await start_session(client)
            await send_message(client, recipients=["b@x.example", "c@x.example"])
            await send_message(client, sender="d@x.example", recipients=["e@x.example"])

    run(main())
    assert seen == [
        (
            str(CLIENT.address),
            CLIENT.hostname,
            HELO.name,
            "alice@example.org",
            None,
            ["b@x.example", "c@x.example"],
        ),
        (str(CLIENT.address), CLIENT.hostname, HELO.name, "d@x.example", None, ["e@x.example"]),
    ]


def test_a_malformed_undecoded_command_fails_the_handler_that_reads_it() -> None:
    # Not decoded as it came, a malformed MAIL is found when read: the handler fails, and
    # the message gets the fallback (TempFail), as when any handler fails.
    app = App("lazy-bad")

    @app.on("eom")
    def record(event: EndOfMessage, ctx: Context) -> None:
        ctx.add_header("X-Sender", str(ctx.message.sender))

    async def main() -> None:
        async with running_server(app) as server, await connect(server) as client:
            await start_session(client)
            await send(client, Macros(stage="M", values={}))
            packet = client.mta.send(EnvFrom(address="a@x.example"))
            # The same length, without the NUL that ends the address: not a MAIL payload.
            client.writer.write(packet[:5] + b"x" * (len(packet) - 5))
            await send(client, EnvRcpt(address="b@x.example"))
            answer = await client.send(EndOfMessage())
            assert answer is not None
            assert answer.verdict == TempFail()
            assert answer.modifications == []

    run(main())
