"""Connection driven directly, for orderings a socket cannot produce on demand."""

from __future__ import annotations

import asyncio
import gc
from typing import Any

from milterapp import App
from milterapp.constants import ActionFlag, ProtocolFlag
from milterapp.events import (
    Body,
    Data,
    EndOfHeaders,
    EnvFrom,
    EnvRcpt,
    Header,
    Macros,
    Negotiate,
    Quit,
)
from milterapp.protocol.codec import encode_command
from milterapp.server.connection import Connection
from tests.server.support import CLIENT, HELO, run


class FakeTransport(asyncio.Transport):
    """Keeps what is written; closing is recorded (the test calls connection_lost)."""

    def __init__(self) -> None:
        super().__init__({"peername": ("192.0.2.1", 25000)})
        self.written = b""
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += bytes(data)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def test_a_handler_that_finishes_after_the_mta_left_still_ends_the_connection() -> None:
    """The MTA resets the connection while an async handler waits; the handler finishes
    before the cancellation lands. The connection must still end (close handlers, done)."""
    app = App("race")
    closes: list[str] = []

    async def main() -> None:
        gate = asyncio.get_running_loop().create_future()

        @app.on("header")
        async def header(event: Any, ctx: Any) -> None:
            await gate

        @app.on("close")
        def close(event: Any, ctx: Any) -> None:
            closes.append(type(event).__name__)

        handler = Connection(app, app.requirements())
        transport = FakeTransport()
        handler.connection_made(transport)
        offer = Negotiate(version=6, actions=ActionFlag.ALL, protocol=ProtocolFlag.NONE)
        for event in (offer, CLIENT, HELO, Macros(stage="M", values={}), EnvFrom(address="a@b")):
            handler.data_received(encode_command(event))
        for event in (EnvRcpt(address="c@d"), Data(), Header(name="Subject", value="x")):
            handler.data_received(encode_command(event))
        assert handler._task is not None  # the header handler waits
        gate.set_result(None)  # it finishes first...
        handler.connection_lost(ConnectionResetError())  # ...then the MTA is gone
        await asyncio.wait_for(asyncio.shield(handler.done), 5)
        assert closes == ["ConnectionClosed"]
        assert transport.closed

    run(main())


def test_the_rest_of_a_large_body_chunk_is_read_into_its_own_buffer() -> None:
    """A body chunk split between reads: the first read goes to the shared buffer, the rest
    is read straight into the chunk's own buffer (get_buffer lends it), and the handler
    sees the whole chunk once."""
    app = App("big")
    chunks: list[bytes] = []

    @app.on("body")
    def body(event: Any) -> None:
        chunks.append(event.chunk)

    async def main() -> None:
        shared = bytearray(256 * 1024)
        handler = Connection(app, app.requirements(), read_buffer=shared)
        transport = FakeTransport()
        handler.connection_made(transport)
        offer = Negotiate(version=6, actions=ActionFlag.ALL, protocol=ProtocolFlag.NONE)
        events = (offer, CLIENT, HELO, EnvFrom(address="a@b"), EnvRcpt(address="c@d"), Data())
        for event in (*events, EndOfHeaders()):
            handler.data_received(encode_command(event))
        chunk = bytes(range(256)) * 255
        wire = encode_command(Body(chunk=chunk))
        await asyncio.sleep(0)  # one turn of the loop: the replies so far are written
        replies = len(transport.written)

        def read(data: bytes) -> int:
            buffer = handler.get_buffer(-1)
            size = min(len(buffer), len(data))
            buffer[:size] = data[:size]
            handler.buffer_updated(size)
            return size

        first = read(wire[:40_000])
        assert first == 40_000
        target = handler.get_buffer(-1)
        assert len(target) == len(wire) - first  # the chunk's own buffer, exactly its rest
        shared[:] = b"\xff" * len(shared)  # another connection's read reuses the buffer
        assert read(wire[first:]) == len(wire) - first
        await asyncio.sleep(0)
        assert chunks == [chunk]
        assert transport.written[replies:] == b"\x00\x00\x00\x01c"  # Continue, once
        assert len(handler.get_buffer(-1)) == len(shared)  # back to the shared buffer

    run(main())


def test_a_finished_connection_leaves_nothing_for_the_cycle_collector() -> None:
    """Every SMTP session opens a connection: its objects must be freed by reference counting
    when it ends, not pile up until the cycle collector runs."""
    app = App("cycles")

    @app.on("header")
    def header(event: Any, ctx: Any) -> None:
        ctx.log.info("seen")  # binds the logger, as a real app does

    async def main() -> int:
        offer = Negotiate(version=6, actions=ActionFlag.ALL, protocol=ProtocolFlag.NONE)
        events = (offer, CLIENT, HELO, EnvFrom(address="a@b"), EnvRcpt(address="c@d"), Data())
        wires = [encode_command(e) for e in (*events, Header(name="S", value="x"))]
        gc.collect()
        gc.disable()
        try:
            for _ in range(5):
                handler = Connection(app, app.requirements())
                transport = FakeTransport()
                handler.connection_made(transport)
                for wire in wires:
                    handler.data_received(wire)
                handler.data_received(encode_command(Quit()))
                handler.connection_lost(None)
                assert handler.done.done()
                del handler, transport
            await asyncio.sleep(0)  # the write batch lets go of the transports
            return gc.collect()
        finally:
            gc.enable()

    assert run(main()) == 0
