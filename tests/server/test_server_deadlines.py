"""Slow and stuck peers: the read deadline (slowloris), the write deadline (an MTA that stops
reading), half-closed sockets, and both event loops.

Nothing sleeps to synchronise: tests wait for the server's own timers (its deadlines close
the connection) or for close handlers. The slowloris client paces its bytes on purpose: that
pacing is the behaviour under test.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest
import structlog

from milterapp import Accept, App
from milterapp.events import EndOfMessage
from milterapp.protocol.framing import LENGTH
from milterapp.replies import AddHeader, Continue
from milterapp.server.loops import run_in_loop
from milterapp.testing import MtaClient
from tests.server.support import (
    TEST_TIMEOUT,
    connect,
    message_events,
    run,
    running_server,
    send,
    send_message,
    start_session,
)


def _events(logs: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [entry for entry in logs if entry["event"] == name]


def stamping_app() -> App:
    app = App("deadlines")

    @app.on("eom")
    def stamp(event: EndOfMessage, ctx: Any) -> Accept:
        ctx.add_header("X-Checked", "yes")
        return Accept()

    return app


def test_a_command_that_never_completes_is_dropped_after_read_timeout() -> None:
    app = stamping_app()

    async def main() -> None:
        async with running_server(app, read_timeout=0.2) as server:
            async with await connect(server) as slow:
                await start_session(slow)
                # Three of the four length bytes of a packet, then nothing.
                slow.writer.write(LENGTH.pack(5)[:3])
                assert await slow.closed_by_milter()
            async with await connect(server) as good:  # the server goes on
                await start_session(good)
                answer = await send_message(good)
                assert answer.verdict == Accept()

    with structlog.testing.capture_logs() as logs:
        run(main())
    [hit] = _events(logs, "read_timeout")
    assert hit["timeout"] == 0.2
    assert hit["buffered"] == 3


def test_slowloris_trickling_bytes_is_dropped_though_never_idle() -> None:
    app = stamping_app()
    packet = LENGTH.pack(200) + b"H" + b"x" * 199  # a HELO that would take 40 s to arrive

    async def main() -> None:
        # The idle deadline alone (0.3 s) never fires: a byte comes every 0.05 s.
        async with (
            running_server(app, read_timeout=0.5, timeout=0.3) as server,
            await connect(server) as slow,
        ):
            await slow.negotiate()

            async def trickle() -> None:
                for index in range(len(packet)):
                    slow.writer.write(packet[index : index + 1])
                    await asyncio.sleep(0.05)  # the pacing under test, not synchronisation

            trickling = asyncio.create_task(trickle())
            try:
                assert await slow.closed_by_milter()
                assert not trickling.done()  # dropped long before the packet was whole
            finally:
                trickling.cancel()

    with structlog.testing.capture_logs() as logs:
        run(main())
    assert _events(logs, "read_timeout")
    assert not _events(logs, "idle_timeout")


def test_an_mta_that_stops_reading_is_dropped_after_write_timeout() -> None:
    app = App("big-replies")
    closed = asyncio.Event()
    big = "x" * 60_000

    @app.on("eom")
    def replies(event: EndOfMessage, ctx: Any) -> Accept:
        for index in range(200):  # some 12 MB of headers: far beyond the socket buffers
            ctx.add_header(f"X-Big-{index}", big)
        return Accept()

    @app.on("close")
    def gone(event: Any, ctx: Any) -> None:
        closed.set()

    async def main() -> None:
        async with running_server(app, write_timeout=0.3) as server:
            host, port = server.address
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, (host, port))
            reader, writer = await asyncio.open_connection(sock=sock)
            client = MtaClient(reader, writer, timeout=5)
            await start_session(client)
            for event in message_events():
                await send(client, event)
            client.writer.write(client.mta.send(EndOfMessage()))
            # Never read the answer: the server's write deadline must end the connection.
            await closed.wait()
            client.writer.close()

    with structlog.testing.capture_logs() as logs:
        run(main())
    [hit] = _events(logs, "write_timeout")
    assert hit["timeout"] == 0.3


def test_a_half_closed_mta_still_gets_its_answer() -> None:
    app = stamping_app()

    async def main() -> None:
        async with running_server(app) as server, await connect(server) as client:
            await start_session(client)
            for event in message_events():
                await send(client, event)
            client.writer.write(client.mta.send(EndOfMessage()))
            client.writer.write_eof()  # shutdown(SHUT_WR): no more commands, still reading
            answer = await client.answer()
            assert answer.verdict == Accept()
            assert answer.modifications == [AddHeader(name="X-Checked", value="yes")]
            assert await client.closed_by_milter()

    run(main())


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_message_through_each_event_loop(loop: str) -> None:
    pytest.importorskip("uvloop", reason="uvloop is not installed (pip install .[speed])")
    app = App("loops")

    @app.on("header")
    async def header(event: Any, ctx: Any) -> None:
        await asyncio.sleep(0)  # an async handler that really suspends

    @app.on("eom")
    def stamp(event: EndOfMessage, ctx: Any) -> Continue:
        ctx.add_header("X-Loop", loop)
        return Continue()

    async def main() -> str:
        async with running_server(app) as server, await connect(server) as client:
            await start_session(client)
            answer = await send_message(client)
            assert answer.verdict == Continue()
            assert answer.modifications == [AddHeader(name="X-Loop", value=loop)]
            return type(asyncio.get_running_loop()).__module__

    module = run_in_loop(asyncio.wait_for(main(), TEST_TIMEOUT), loop)
    assert module.startswith(loop)
