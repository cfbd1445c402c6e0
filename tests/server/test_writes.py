"""Replies leave at once: the server disables Nagle's algorithm on inet connections."""

from __future__ import annotations

import asyncio
import socket

from milterapp.server.writes import no_delay
from tests.server.support import run


def test_no_delay_sets_tcp_nodelay_on_inet_streams() -> None:
    async def main() -> int:
        accepted: asyncio.Future[asyncio.StreamWriter] = asyncio.get_running_loop().create_future()

        async def on_connect(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            accepted.set_result(writer)

        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        server = await asyncio.start_server(on_connect, sock=listener)
        _, client = await asyncio.open_connection(*listener.getsockname())
        writer = await accepted
        sock = writer.get_extra_info("socket")
        before = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        no_delay(writer)
        after = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        for stream in (client, writer):
            stream.close()
        server.close()
        await server.wait_closed()
        assert before == 0  # what asyncio leaves: the reason for no_delay
        return int(after)

    assert run(main()) == 1
