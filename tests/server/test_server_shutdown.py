"""Graceful shutdown, lifecycle hooks and stopping from another thread, over real sockets."""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path

import pytest

from milterapp.app import App
from milterapp.context import Context
from milterapp.errors import ServerError, SetupError
from milterapp.events import ConnectionClosed, ConnectionOpened, EndOfMessage, Quit
from milterapp.handlers import CloseEvent
from milterapp.replies import AddHeader, Continue, TempFail
from milterapp.server import MilterServer, serve
from milterapp.testing import MtaClient
from tests.server.support import (
    LOOPBACK,
    connect,
    message_events,
    run,
    running_server,
    send,
    send_message,
    start_session,
    target,
    until,
)


async def send_until_eom(client: MtaClient) -> None:
    """Send a whole message and its end of message, without waiting for that answer."""
    for event in message_events():
        await send(client, event)
    client.writer.write(client.mta.send(EndOfMessage()))
    await client.writer.drain()


def accepting(server: MilterServer) -> bool:
    """Whether the server still accepts connections (its close has not begun)."""
    assert server._acceptor is not None
    return server._acceptor.accepting


def test_shutdown_lets_message_in_flight_finish_and_refuses_new_connections() -> None:
    app = App("graceful")
    entered = asyncio.Event()
    release = asyncio.Event()

    @app.on("eom")
    async def slow(event: EndOfMessage, ctx: Context) -> None:
        entered.set()
        await release.wait()
        ctx.add_header("X-Finished", "yes")

    async def main() -> None:
        server = MilterServer(app, spec=LOOPBACK)
        await server.start()
        address = target(server)
        client = await connect(server)
        try:
            await start_session(client)
            await send_until_eom(client)
            await entered.wait()
            app.shutdown()
            await server.wait_stopped()
            closing = asyncio.create_task(server.close())
            await until(lambda: not accepting(server))
            with pytest.raises((ConnectionRefusedError, ConnectionResetError)):
                await MtaClient.connect(address, timeout=5)
            assert not closing.done()  # still draining the message in flight
            release.set()
            answer = await client.answer()
            assert answer.modifications == [AddHeader(name="X-Finished", value="yes")]
            assert answer.verdict == Continue()
            assert await client.closed_by_milter()
            await closing
        finally:
            await client.close(quit=False)

    run(main())


def test_shutdown_waits_for_the_mta_to_finish_an_open_message() -> None:
    app = App("graceful")
    opened = asyncio.Event()

    @app.on("envfrom")
    def mail(event: object) -> None:
        opened.set()

    @app.on("eom")
    def stamp(event: EndOfMessage, ctx: Context) -> None:
        ctx.add_header("X-Finished", "yes")

    async def main() -> None:
        server = MilterServer(app, spec=LOOPBACK)
        await server.start()
        client = await connect(server)
        try:
            await start_session(client)
            events = message_events()
            await send(client, events[0])  # D for MAIL
            await send(client, events[1])  # MAIL: a message is open
            await opened.wait()
            app.shutdown()
            await server.wait_stopped()
            closing = asyncio.create_task(server.close())
            await until(lambda: not accepting(server))
            for event in events[2:]:
                await send(client, event)
            answer = await client.send(EndOfMessage())
            assert answer is not None
            assert answer.modifications == [AddHeader(name="X-Finished", value="yes")]
            assert answer.verdict == Continue()
            assert await client.closed_by_milter()
            await closing
        finally:
            await client.close(quit=False)

    run(main())


def test_shutdown_grace_expired_answers_tempfail() -> None:
    app = App("stuck")
    entered = asyncio.Event()

    @app.on("eom")
    async def stuck(event: EndOfMessage) -> None:
        entered.set()
        await asyncio.Event().wait()  # never finishes (the handler deadline is 25 s)

    async def main() -> None:
        server = MilterServer(app, spec=LOOPBACK, shutdown_grace=0.2)
        await server.start()
        client = await connect(server)
        try:
            await start_session(client)
            await send_until_eom(client)
            await entered.wait()
            app.shutdown()
            await server.wait_stopped()
            loop = asyncio.get_running_loop()
            began = loop.time()
            await server.close()
            elapsed = loop.time() - began
            assert 0.15 <= elapsed < 3.0
            answer = await client.answer()
            assert answer.modifications == []
            assert answer.verdict == TempFail()
            assert await client.closed_by_milter()
        finally:
            await client.close(quit=False)

    run(main())


def test_shutdown_closes_idle_connections_at_once() -> None:
    app = App("idle")

    async def main() -> None:
        server = MilterServer(app, spec=LOOPBACK)  # shutdown_grace: 30 s
        await server.start()
        idle = [await connect(server) for _ in range(3)]
        try:
            for client in idle:
                await start_session(client)
            app.shutdown()
            await server.wait_stopped()
            async with asyncio.timeout(3):  # far less than the grace period
                await server.close()
            for client in idle:
                assert await client.closed_by_milter()
        finally:
            for client in idle:
                await client.close(quit=False)

    run(main())


def test_shutdown_of_idle_connection_runs_close_handler() -> None:
    app = App("idle-close")
    closes: list[CloseEvent] = []

    @app.on("close")
    def on_close(event: CloseEvent) -> None:
        closes.append(event)

    async def main() -> None:
        server = MilterServer(app, spec=LOOPBACK)
        await server.start()
        async with await connect(server) as client:
            await start_session(client)
            app.shutdown()
            await server.wait_stopped()
            await server.close()
            assert await client.closed_by_milter()

    run(main())
    assert closes == [ConnectionClosed()]


def test_shutdown_hooks_run_around_connections_in_order() -> None:
    app = App("hooks")
    order: list[str] = []
    closed = asyncio.Event()

    @app.on_startup
    def first_startup() -> None:
        order.append("startup 1")

    @app.on_startup
    async def second_startup() -> None:
        order.append("startup 2")

    @app.on_shutdown
    def first_shutdown() -> None:
        order.append("shutdown 1")

    @app.on_shutdown
    async def second_shutdown() -> None:
        order.append("shutdown 2")

    @app.on("open")
    def opened(event: ConnectionOpened) -> None:
        order.append("open")

    @app.on("close")
    def on_close(event: CloseEvent) -> None:
        order.append(f"close {type(event).__name__}")
        closed.set()

    async def main() -> None:
        async with running_server(app) as server:
            assert order == ["startup 1", "startup 2"]
            async with await connect(server) as client:
                await start_session(client)
                assert (await send_message(client)).verdict == Continue()
            await closed.wait()
            assert "shutdown 1" not in order
        assert order[-2:] == ["shutdown 2", "shutdown 1"]  # reverse order, after the stop

    run(main())
    assert order == ["startup 1", "startup 2", "open", "close Quit", "shutdown 2", "shutdown 1"]


def test_shutdown_failing_startup_hook_is_setup_error_and_removes_socket(sock_dir: Path) -> None:
    app = App("failing-start")
    path = sock_dir / "milter.sock"
    attempts: list[bool] = []

    @app.on_startup
    def connect_database() -> None:
        attempts.append(path.exists())
        if len(attempts) == 1:
            raise ConnectionError("database down")

    @app.on("eom")
    def stamp(event: EndOfMessage, ctx: Context) -> None:
        ctx.add_header("X-Started", "yes")

    server = MilterServer(app, spec=f"unix:{path}")
    with pytest.raises(SetupError, match="database down"):
        run(server.start())
    assert not os.path.lexists(path)
    assert not app.serving.running  # not left "running"

    async def main() -> None:  # the app can be served once the cause is fixed
        async with running_server(app, f"unix:{path}") as second, await connect(second) as client:
            await start_session(client)
            answer = await send_message(client)
            assert answer.modifications == [AddHeader(name="X-Started", value="yes")]

    run(main())
    assert attempts == [True, True]  # the socket exists while startup hooks run


def test_shutdown_failing_startup_hook_removes_socket_even_if_kept_on_close(
    sock_dir: Path,
) -> None:
    app = App("failing-start")
    path = sock_dir / "milter.sock"

    @app.on_startup
    def broken() -> None:
        raise RuntimeError("no config")

    server = MilterServer(app, spec=f"unix:{path}", remove_unix_socket_on_close=False)
    with pytest.raises(SetupError):
        run(server.start())
    assert not os.path.lexists(path)


def test_shutdown_registering_after_start_is_setup_error() -> None:
    app = App("late")

    def handler(event: object) -> None:
        return None

    async def main() -> None:
        async with running_server(app):
            with pytest.raises(SetupError, match="already serving"):
                app.add_handler("eom", handler)
            with pytest.raises(SetupError, match="already serving"):
                app.on("helo")(handler)
            with pytest.raises(SetupError, match="already serving"):
                app.on_shutdown(lambda: None)
            with pytest.raises(SetupError, match="already serving"):
                app.on_error(ValueError)(lambda exc, ctx: None)
        assert not app.handles("eom")

    run(main())


def test_shutdown_close_after_failed_start_leaves_running_server_alone() -> None:
    app = App("twice")

    async def main() -> None:
        server = MilterServer(app, spec=LOOPBACK)
        await server.start()
        try:
            second = MilterServer(app, spec=LOOPBACK)
            with pytest.raises(ServerError):
                await second.start()
            await second.close()  # try/finally clean-up of a server that never started
            app.shutdown()
            async with asyncio.timeout(2):
                await server.wait_stopped()
        finally:
            server.request_stop()
            await server.close()

    run(main())


def test_shutdown_close_twice_runs_shutdown_hooks_once() -> None:
    app = App("closed-twice")
    calls: list[str] = []

    @app.on_shutdown
    def release_pool() -> None:
        calls.append("shutdown")

    async def main() -> None:
        server = MilterServer(app, spec=LOOPBACK)
        await server.start()
        app.shutdown()
        await server.wait_stopped()
        await server.close()
        await server.close()

    run(main())
    assert calls == ["shutdown"]


# --- serve() -------------------------------------------------------------------------------


def test_serve_stopped_by_shutdown_from_another_thread(sock_dir: Path) -> None:
    app = App("threaded")
    path = sock_dir / "milter.sock"
    ready = asyncio.Event()
    closed = asyncio.Event()
    closes: list[CloseEvent] = []

    @app.on_startup
    def started() -> None:
        ready.set()

    @app.on("eom")
    def stamp(event: EndOfMessage, ctx: Context) -> None:
        ctx.add_header("X-Served", "yes")

    @app.on("close")
    def on_close(event: CloseEvent) -> None:
        closes.append(event)
        closed.set()

    async def main() -> None:
        serving = asyncio.create_task(serve(app, f"unix:{path}", handle_signals=False))
        await ready.wait()
        async with await MtaClient.connect(f"unix:{path}", timeout=5) as client:
            await start_session(client)
            answer = await send_message(client)
            assert answer.modifications == [AddHeader(name="X-Served", value="yes")]
        await closed.wait()
        assert not serving.done()
        stopper = threading.Thread(target=app.shutdown)
        stopper.start()
        await asyncio.to_thread(stopper.join)
        await serving
        assert not path.exists()

    run(main())
    assert closes == [Quit()]
    assert not app.serving.running


def test_serve_app_shutdown_when_not_serving_does_nothing() -> None:
    app = App("idle")
    app.shutdown()  # no server: no effect, no error

    async def main() -> None:
        async with running_server(app) as server, await connect(server) as client:
            await start_session(client)
            assert (await send_message(client)).verdict == Continue()

    run(main())
