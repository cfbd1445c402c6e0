"""ConnectionHandler driven directly, for orderings a socket cannot produce on demand."""

from __future__ import annotations

import asyncio
from typing import Any

from milterapp import App
from milterapp.events import Data, EnvFrom, EnvRcpt, Header, Macros, Negotiate
from milterapp.protocol.codec import encode_command
from milterapp.protocol.constants import ActionFlag, ProtocolFlag
from milterapp.session import ConnectionHandler
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

        handler = ConnectionHandler(app, app.requirements())
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
