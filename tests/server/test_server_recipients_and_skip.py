"""What ctx.message keeps of refused recipients, and Skip when it cannot be passed on."""

from __future__ import annotations

from milterapp import App, Body, Context, EndOfMessage, EnvRcpt, Reject, Skip, TempFail
from milterapp.events import EnvFrom
from tests.server.support import connect, run, running_server, send_message, start_session


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
                reply = await client.negotiate()
                assert not reply.protocol & reply.protocol.SKIP  # not asked for
                await send_message(client, body=b"whole body\r\n")

    run(main())
    assert bodies == [b"whole body\r\n"]
