"""Replies leave at once: Nagle's algorithm is off on every inet connection the server
accepts, on both loops (uvloop disables it itself, the acceptor does on asyncio's loop)."""

from __future__ import annotations

import asyncio
import socket

import pytest
import structlog

from milterapp.server.acceptor import Acceptor
from milterapp.server.writes import WriteBatch
from tests.server.support import LOOPS, connect, run, running_server, stamping_app, until


@pytest.mark.parametrize("loop", LOOPS)
def test_accepted_inet_connections_send_without_delay(loop: str) -> None:
    async def main() -> int:
        async with running_server(stamping_app()) as server:
            client = await connect(server)
            try:
                await until(lambda: len(server._connections) == 1)
                (connection,) = server._connections
                assert connection.transport is not None
                sock = connection.transport.get_extra_info("socket")
                return int(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            finally:
                await client.close()

    assert run(main(), loop=loop) == 1


def test_the_acceptor_disables_nagle_where_the_loop_would_not() -> None:
    # asyncio's loop leaves it on for a socket made without IPPROTO_TCP named (proto 0).
    async def main() -> int:
        loop = asyncio.get_running_loop()
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        made: asyncio.Future[asyncio.BaseTransport] = loop.create_future()

        class Protocol(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                made.set_result(transport)

        acceptor = Acceptor(loop, listener, Protocol, structlog.get_logger())
        acceptor.start()
        client = socket.create_connection(listener.getsockname())
        try:
            transport = await made
            sock = transport.get_extra_info("socket")
            assert sock.proto == 0
            return int(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        finally:
            client.close()
            transport.close()
            await acceptor.close()
            listener.close()

    assert run(main()) == 1


def test_a_batch_writes_in_order_and_skips_closed_transports() -> None:
    class Recording(asyncio.Transport):
        def __init__(self, closing: bool = False) -> None:
            super().__init__()
            self.written: list[bytes] = []
            self.closing = closing

        def write(self, data: bytes | bytearray | memoryview) -> None:
            self.written.append(bytes(data))

        def is_closing(self) -> bool:
            return self.closing

    async def main() -> tuple[list[bytes], list[bytes]]:
        batch = WriteBatch(asyncio.get_running_loop())
        open_, closed = Recording(), Recording(closing=True)
        batch.add(open_, b"a")
        batch.add(closed, b"x")
        batch.add(open_, b"b")
        assert open_.written == []  # not before the end of the loop's turn
        await asyncio.sleep(0)
        return open_.written, closed.written

    assert run(main()) == ([b"a", b"b"], [])
