"""What goes wrong, over a real socket: idle connections, failing and slow handlers, progress
during a long end of message, protocol errors, several messages and sessions per connection."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from milterapp.app import App
from milterapp.constants import ActionFlag, ProtocolFlag
from milterapp.context import Context
from milterapp.errors import ActionNotNegotiated, RemoteProtocolError
from milterapp.events import (
    Abort,
    Connect,
    ConnectionClosed,
    ConnectionOpened,
    EndOfMessage,
    EnvFrom,
    Negotiate,
    Quit,
    QuitNoClose,
)
from milterapp.handlers import CloseEvent
from milterapp.replies import (
    AddHeader,
    Continue,
    Progress,
    Reject,
    TempFail,
)
from milterapp.testing import MtaClient
from tests.server.support import (
    CLIENT,
    HELO,
    connect,
    message_events,
    run,
    running_server,
    send,
    send_message,
    start_session,
    target,
)

# --- inactivity timeout --------------------------------------------------------------------


def test_timeout_idle_connection_is_closed_by_server() -> None:
    app = App("idle")
    closes: list[CloseEvent] = []
    closed = asyncio.Event()

    @app.on("close")
    def on_close(event: CloseEvent) -> None:
        closes.append(event)
        closed.set()

    async def main() -> None:
        async with running_server(app, timeout=0.2) as server, await connect(server) as client:
            await client.negotiate()
            assert await client.closed_by_milter()
            await closed.wait()

    run(main())
    assert closes == [ConnectionClosed()]


def test_timeout_applies_between_commands_not_to_a_whole_session() -> None:
    app = App("busy")

    @app.on("eom")
    def stamp(event: EndOfMessage, ctx: Context) -> None:
        ctx.add_header("X-N", str(ctx.state.setdefault("n", 0)))

    async def main() -> None:
        # Each message is quick; the session as a whole lasts as long as the MTA talks.
        async with running_server(app, timeout=0.5) as server, await connect(server) as client:
            await start_session(client)
            for _ in range(5):
                assert (await send_message(client)).verdict == Continue()

    run(main())


# --- failing handlers ----------------------------------------------------------------------


def test_failure_raising_handler_tempfails_and_next_message_continues() -> None:
    app = App("raising")

    @app.on("envfrom")
    def flaky(event: EnvFrom, ctx: Context) -> None:
        ctx.state["calls"] = ctx.state.get("calls", 0) + 1
        if ctx.state["calls"] == 1:
            raise RuntimeError("database unreachable")

    async def main() -> None:
        async with running_server(app) as server, await connect(server) as client:
            await start_session(client)
            assert (await send_message(client)).verdict == TempFail()
            assert (await send_message(client)).verdict == Continue()

    run(main())


def test_failure_app_fallback_reject_is_used() -> None:
    app = App("strict", fallback=Reject())

    @app.on("envfrom")
    def broken(event: EnvFrom) -> None:
        raise RuntimeError("bug")

    async def main() -> None:
        async with running_server(app) as server, await connect(server) as client:
            await start_session(client)
            assert (await send_message(client)).verdict == Reject()

    run(main())


class SubValueError(ValueError):
    pass


def test_failure_error_mapper_applies_to_class_and_subclasses_only() -> None:
    app = App("mapped")
    mapped: list[type[BaseException]] = []

    @app.on("envfrom")
    def raiser(event: EnvFrom) -> None:
        local = event.address.partition("@")[0]
        raise {"value": ValueError, "sub": SubValueError, "key": KeyError}[local](local)

    @app.on_error(ValueError)
    def bad_value(exc: ValueError, ctx: Context) -> Reject:
        mapped.append(type(exc))
        return Reject(code=550, text="bad")

    async def main() -> None:
        async with running_server(app) as server, await connect(server) as client:
            await start_session(client)
            verdicts = [
                (await send_message(client, sender=f"{local}@example.org")).verdict
                for local in ("value", "sub", "key")
            ]
        assert verdicts == [Reject(code=550, text="bad"), Reject(code=550, text="bad"), TempFail()]

    run(main())
    assert mapped == [ValueError, SubValueError]


def test_failure_app_handler_timeout_tempfails() -> None:
    app = App("slow", handler_timeout=0.1)
    started = asyncio.Event()

    @app.on("envfrom")
    async def stuck(event: EnvFrom) -> None:
        started.set()
        await asyncio.Event().wait()  # never set: only the deadline ends this

    async def main() -> None:
        async with running_server(app) as server, await connect(server) as client:
            await start_session(client)
            assert (await send_message(client)).verdict == TempFail()
            assert started.is_set()

    run(main())


def test_failure_per_handler_timeout_tempfails() -> None:
    app = App("slow-one")  # the app's deadline (25 s) is far beyond the test's bound

    @app.on("envfrom", timeout=0.1)
    async def stuck(event: EnvFrom) -> None:
        await asyncio.Event().wait()

    async def main() -> None:
        async with running_server(app) as server, await connect(server) as client:
            await start_session(client)
            assert (await send_message(client)).verdict == TempFail()

    run(main())


def test_failure_non_reply_return_value_tempfails() -> None:
    app = App("confused")

    @app.on("envfrom")  # type: ignore[type-var]  # mypy sees the mistake; the server too
    def says_ok(event: EnvFrom) -> str:
        return "ok"

    async def main() -> None:
        async with running_server(app) as server, await connect(server) as client:
            await start_session(client)
            assert (await send_message(client)).verdict == TempFail()

    run(main())


# --- progress while end of message runs -------------------------------------------------------


def test_progress_sent_automatically_while_eom_handler_runs() -> None:
    app = App("thinking", progress_interval=0.05)
    go_on = asyncio.Event()

    @app.on("eom")
    async def think(event: EndOfMessage, ctx: Context) -> None:
        await go_on.wait()  # set by the MTA side once it has seen two progress packets
        ctx.add_header("X-Thought", "long")

    async def main() -> None:
        async with running_server(app) as server, await connect(server) as client:
            await start_session(client)
            for event in message_events():
                await send(client, event)
            # End of message, read reply by reply (collect_answer would hide the progress).
            client.writer.write(client.mta.send(EndOfMessage()))
            await client.writer.drain()
            replies: list[object] = []
            while client.mta.awaiting_reply:
                data = await client.reader.read(65536)
                assert data, "the milter closed the connection"
                client.mta.receive_data(data)
                while (reply := client.mta.next_reply()) is not None:
                    replies.append(reply)
                    if replies.count(Progress()) == 2:
                        go_on.set()
            progress = replies.count(Progress())
            assert progress >= 2
            assert replies[:progress] == [Progress()] * progress
            assert replies[progress:] == [AddHeader(name="X-Thought", value="long"), Continue()]

    run(main())


# --- messages and sessions on one connection -----------------------------------------------


def test_connection_several_messages_each_stamped_once() -> None:
    app = App("stamper")

    @app.on("eom")
    def stamp(event: EndOfMessage, ctx: Context) -> None:
        ctx.state["n"] = ctx.state.get("n", 0) + 1
        ctx.add_header("X-Message", str(ctx.state["n"]))

    async def main() -> None:
        async with running_server(app) as server, await connect(server) as client:
            await start_session(client)
            for number in (1, 2, 3):
                answer = await send_message(client)
                assert answer.modifications == [AddHeader(name="X-Message", value=str(number))]
                assert answer.verdict == Continue()

    run(main())


async def start_session_again(client: MtaClient) -> None:
    """CONNECT and HELO of a new SMTP session on a connection reused after QuitNoClose."""
    for event in (CLIENT, HELO):  # no new negotiation: QUIT_NC keeps it
        answer = await send(client, event)
        assert answer is None or answer.verdict == Continue()


def test_connection_reused_after_quit_no_close_gets_a_new_session() -> None:
    app = App("reuse")
    log: list[tuple[str, object]] = []
    closes = asyncio.Queue[CloseEvent]()

    @app.on("open")
    def opened(event: ConnectionOpened, ctx: Context) -> None:
        log.append(("open", ctx.conn_id))

    @app.on("connect")
    def connected(event: Connect, ctx: Context) -> None:
        log.append(("connect-state", dict(ctx.state)))
        ctx.state["session"] = "mine"

    @app.on("close")
    def on_close(event: CloseEvent, ctx: Context) -> None:
        log.append(("close", type(event).__name__))
        closes.put_nowait(event)

    @app.on("eom")
    def stamp(event: EndOfMessage, ctx: Context) -> None:
        ctx.add_header("X-Session", ctx.conn_id)

    async def main() -> None:
        async with running_server(app) as server, await connect(server) as client:
            await start_session(client)
            first = await send_message(client)
            await client.send(QuitNoClose())
            assert await closes.get() == QuitNoClose()
            await start_session_again(client)
            second = await send_message(client)
            assert first.verdict == second.verdict == Continue()
            assert first.modifications != second.modifications  # a new context
            await client.close()
            assert await closes.get() == Quit()

    run(main())
    assert log == [
        ("open", "1"),
        ("connect-state", {}),
        ("close", "QuitNoClose"),
        ("open", "1.1"),  # each session on the reused socket is opened and closed
        ("connect-state", {}),  # a new session starts with empty state
        ("close", "Quit"),
    ]


def test_connection_reused_after_quit_no_close_keeps_negotiated_options() -> None:
    app = App("reuse-options", actions=ActionFlag.ADDHDRS)
    options: list[object] = []

    @app.on("eom")
    def modify(event: EndOfMessage, ctx: Context) -> None:
        options.append(ctx.options)
        with contextlib.suppress(ActionNotNegotiated):
            ctx.change_sender("other@example.org")  # not granted: the handler copes
        ctx.add_header("X-Checked", "yes")

    async def main() -> None:
        async with running_server(app) as server, await connect(server) as client:
            await start_session(client)
            answers = [await send_message(client)]
            await client.send(QuitNoClose())
            await start_session_again(client)
            answers.append(await send_message(client))
            for answer in answers:
                assert answer.modifications == [AddHeader(name="X-Checked", value="yes")]
                assert answer.verdict == Continue()

    run(main())
    assert options[0] is not None
    assert options[1] == options[0]  # QUIT_NC keeps the negotiated options


def test_connection_abort_mid_message_then_new_message_works() -> None:
    app = App("aborts")
    aborts: list[str | None] = []

    @app.on("abort")
    def aborted(event: Abort, ctx: Context) -> None:
        aborts.append(ctx.message.sender.address if ctx.message.begun else None)

    @app.on("eom")
    def stamp(event: EndOfMessage, ctx: Context) -> None:
        ctx.add_header("X-Sender", ctx.message.sender.address)

    @app.on("envfrom")
    def sender(event: EnvFrom) -> None:
        return None

    async def main() -> None:
        async with running_server(app) as server, await connect(server) as client:
            await start_session(client)
            await send(client, EnvFrom(address="first@example.org"))
            await client.send(Abort())
            answer = await send_message(client, sender="second@example.org")
            assert answer.modifications == [AddHeader(name="X-Sender", value="second@example.org")]
            assert answer.verdict == Continue()

    run(main())
    assert aborts == ["first@example.org"]


def test_connection_protocol_error_closes_only_that_connection() -> None:
    app = App("robust")

    @app.on("eom")
    def stamp(event: EndOfMessage, ctx: Context) -> None:
        ctx.add_header("X-Ok", "1")

    async def main() -> None:
        async with running_server(app) as server:
            async with await connect(server) as bad, await connect(server) as good:
                await start_session(bad)
                await start_session(good)
                bad.writer.write(b"\x00\x00\x00\x00")  # a zero-length packet
                await bad.writer.drain()
                assert await bad.closed_by_milter()
                answer = await send_message(good)
                assert answer.verdict == Continue()
                await bad.close(quit=False)
            async with await connect(server) as later:
                await start_session(later)
                assert (await send_message(later)).modifications == [
                    AddHeader(name="X-Ok", value="1")
                ]

    run(main())


def test_connection_garbage_before_negotiation_closes_it() -> None:
    app = App("robust")

    async def main() -> None:
        async with running_server(app) as server:
            async with await connect(server) as bad:
                bad.writer.write(b"\x00\x00\x00\x01C")  # CONNECT before negotiation
                await bad.writer.drain()
                assert await bad.closed_by_milter()
                await bad.close(quit=False)
            async with await connect(server) as later:
                await start_session(later)
                assert (await send_message(later)).verdict == Continue()

    run(main())


def test_connection_protocol_error_still_runs_close_handler() -> None:
    app = App("cleanup")
    closes: list[CloseEvent] = []
    opened = asyncio.Event()

    @app.on("open")
    def on_open(event: ConnectionOpened) -> None:
        opened.set()

    @app.on("close")
    def on_close(event: CloseEvent) -> None:
        closes.append(event)

    async def main() -> None:
        async with running_server(app) as server, await connect(server) as bad:
            await start_session(bad)
            await opened.wait()
            bad.writer.write(b"\x00\x00\x00\x00")
            await bad.writer.drain()
            assert await bad.closed_by_milter()
            await bad.close(quit=False)
        # The server has closed: every connection task has finished.

    run(main())
    assert closes == [ConnectionClosed()]


def test_connection_crash_in_close_handler_does_not_break_server() -> None:
    app = App("crashy")
    calls = asyncio.Queue[str]()

    @app.on("close")
    def on_close(event: CloseEvent, ctx: Context) -> None:
        calls.put_nowait(ctx.conn_id)
        raise RuntimeError("cleanup failed")

    @app.on("eom")
    def stamp(event: EndOfMessage, ctx: Context) -> None:
        ctx.add_header("X-Conn", ctx.conn_id)

    async def main() -> None:
        async with running_server(app) as server:
            for number in ("1", "2"):
                async with await connect(server) as client:
                    await start_session(client)
                    answer = await send_message(client)
                    assert answer.modifications == [AddHeader(name="X-Conn", value=number)]
                assert await calls.get() == number

    run(main())


def test_connection_negotiation_failure_closes_without_reply() -> None:
    app = App("demanding", actions=ActionFlag.CHGFROM)
    offer = Negotiate(version=6, actions=ActionFlag.ADDHDRS, protocol=ProtocolFlag.ALL)

    async def main() -> None:
        async with running_server(app) as server:
            async with await MtaClient.connect(target(server), offer=offer, timeout=5) as mta:
                with pytest.raises(RemoteProtocolError, match="closed the connection"):
                    await mta.negotiate()
            async with await connect(server) as client:  # a capable MTA is served
                reply = await client.negotiate()
                assert reply.actions == ActionFlag.CHGFROM

    run(main())


def test_connection_mta_gone_during_eom_does_not_break_server() -> None:
    app = App("orphan")
    entered = asyncio.Event()
    release = asyncio.Event()
    finished = asyncio.Event()

    @app.on("eom")
    async def slow(event: EndOfMessage, ctx: Context) -> None:
        entered.set()
        await release.wait()
        ctx.add_header("X-Late", "yes")
        finished.set()

    async def main() -> None:
        async with running_server(app) as server:
            gone = await connect(server)
            await start_session(gone)
            for event in message_events():
                await send(gone, event)
            gone.writer.write(gone.mta.send(EndOfMessage()))
            await gone.writer.drain()
            await entered.wait()
            await gone.close(quit=False)  # the MTA gives up on us
            release.set()
            await finished.wait()
            async with await connect(server) as client:
                await start_session(client)
                answer = await send_message(client)
                assert answer.modifications == [AddHeader(name="X-Late", value="yes")]

    run(main())
