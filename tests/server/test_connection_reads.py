"""How a connection reads: on uvloop, each read handed over as bytes until a packet too large
for one read begins, then straight into that packet's buffer; the message arrives whole
either way, on both loops."""

from __future__ import annotations

import hashlib

import pytest

from milterapp.app import App
from milterapp.context import Context
from milterapp.events import Body, EndOfMessage
from milterapp.replies import AddHeader
from milterapp.server import MilterServer
from milterapp.server.connection import Connection
from milterapp.testing import MtaClient
from tests.server.support import (
    LOOPS,
    connect,
    message_events,
    run,
    running_server,
    send,
    start_session,
    until,
)

CHUNK = bytes(range(256)) * 255 + b"\r\n\r\n\r\n"  # 65,286 bytes, every byte value


def digesting_app() -> App:
    """An app that answers each message with a header naming its body's digest."""
    app = App("reads", keep_message=True)

    @app.on("eom")
    def digest(event: EndOfMessage, ctx: Context) -> None:
        ctx.add_header("X-Body", hashlib.sha256(ctx.message.body_bytes()).hexdigest()[:16])

    return app


def only_connection(server: MilterServer) -> Connection:
    (connection,) = server._connections
    return connection


async def send_split(client: MtaClient, packet: bytes, first: int, server: MilterServer) -> None:
    """Write ``packet`` in two parts, the second once the server has read the first."""
    client.writer.write(packet[:first])
    await client.writer.drain()
    connection = only_connection(server)
    await until(lambda: connection.machine.buffered >= first or not connection._plain_reads)
    client.writer.write(packet[first:])
    await client.writer.drain()


@pytest.mark.parametrize("loop", LOOPS)
def test_a_large_packet_split_across_reads_arrives_whole(loop: str) -> None:
    async def main() -> tuple[list[bool], str]:
        async with running_server(digesting_app()) as server, await connect(server) as client:
            await start_session(client)
            modes = [only_connection(server)._plain_reads]
            for event in message_events(body=b""):
                await send(client, event)
            await send(client, Body(chunk=CHUNK))  # whole, in one write
            packet = client.mta.send(Body(chunk=CHUNK))
            await send_split(client, packet, 20_000, server)
            modes.append(only_connection(server)._plain_reads)
            answer = await client.send(EndOfMessage())
            assert answer is not None
            # The next message on the same connection, read the new way.
            for event in message_events(body=CHUNK):
                await send(client, event)
            again = await client.send(EndOfMessage())
            assert again is not None
            assert again.modifications == [
                AddHeader(name="X-Body", value=hashlib.sha256(CHUNK).hexdigest()[:16])
            ]
        header = answer.modifications[0]
        assert isinstance(header, AddHeader)
        return modes, header.value

    modes, digest = run(main(), loop=loop)
    assert digest == hashlib.sha256(CHUNK * 2).hexdigest()[:16]
    # uvloop: plain reads first, buffered once the split packet began; asyncio: buffered.
    assert modes == ([True, False] if loop == "uvloop" else [False, False])
