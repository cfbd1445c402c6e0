"""Connection handler benchmark: microseconds of Python per message, without sockets.

The server's own :class:`~milterapp.server.connection.Connection` is given a transport that
keeps nothing, and the transaction of ``protocol_bench.py`` is fed to it one MTA write at a
time (a macro packet and its command together), through ``get_buffer()`` and
``buffer_updated()`` as the event loop does after each read.
This is the framework's whole cost per message (codec, state machine, context, dispatch,
replies), apart from the event loop and the system calls; the load generator measures those.

Three apps: the reference milter (a plain handler on every event, a header added and Accept
at end of message), the same with async handlers, and an app with only an end-of-message
handler. Run: ``python bench/handler_bench.py [--transactions N] [--app plain|async|eom]
[--body-size BYTES]`` (the body goes in chunks of 65,535 bytes, as Postfix sends it).
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import time
from typing import Any

from protocol_bench import SETUP, transaction
from refmilter import build

from milterapp import Accept, App
from milterapp.events import Abort, EndOfMessage, Event, Macros
from milterapp.protocol.codec import encode_command
from milterapp.protocol.stages import BY_EVENT
from milterapp.server.connection import Connection


def async_reference_app() -> App:
    """The reference app with async handlers (each answer then needs a task step)."""
    app = App("bench-async")
    for name in ("connect", "helo", "envfrom", "envrcpt", "data", "header", "eoh", "body"):

        async def go_on(event: Any, ctx: Any) -> None:
            return None

        app.on(name)(go_on)  # type: ignore[call-overload]

    @app.on("eom")
    async def stamp(event: Any, ctx: Any) -> Accept:
        ctx.add_header("X-Bench", "yes")
        return Accept()

    return app


class NullTransport(asyncio.Transport):
    """Counts what is written; reading is never paused for long."""

    def __init__(self) -> None:
        super().__init__({"peername": ("127.0.0.1", 40000)})
        self.writes = 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.writes += 1

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def close(self) -> None:
        pass


def writes_of(events: list[Event]) -> list[bytes]:
    """The MTA's writes: each command together with the macros sent just before it."""
    writes: list[bytes] = []
    pending = b""
    for event in events:
        pending += encode_command(event)
        if not isinstance(event, Macros):
            writes.append(pending)
            pending = b""
    return writes


async def measure(app: App, count: int, rounds: int, body_size: int) -> float:
    events = [*transaction(body_size), Abort()]  # Postfix aborts after each message, then reuses
    # The MTA sends macros, end of message and abort always, the other events when asked.
    asked = app.requirements().events
    events = [
        e
        for e in events
        if isinstance(e, Macros | EndOfMessage | Abort) or BY_EVENT[type(e)].name in asked
    ]
    writes = writes_of(events)
    # Reads go through get_buffer() and buffer_updated(), into a shared buffer, as the
    # server's event loop does them.
    handler = Connection(app, app.requirements(), read_buffer=bytearray(256 * 1024))
    transport = NullTransport()
    handler.connection_made(transport)
    for data in writes_of(SETUP):
        handler.data_received(data)
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(count):
            for data in writes:
                size = len(data)
                handler.get_buffer(-1)[:size] = data
                handler.buffer_updated(size)
                # An async handler: let its task finish, one turn of the loop at a time.
                while handler._task is not None:  # noqa: ASYNC110
                    await asyncio.sleep(0)
        best = min(best, (time.perf_counter() - start) / count * 1e6)
    assert handler.error is None, handler.error
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--transactions", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--app", choices=("plain", "async", "eom"), action="append", help="only these apps"
    )
    parser.add_argument("--body-size", type=int, default=4096, help="bytes of body (4096)")
    args = parser.parse_args()
    print(f"python {platform.python_version()} on {platform.machine()}, best of {args.rounds}")
    for key, label, app in (
        ("plain", "reference app, plain handlers", build()),
        ("async", "reference app, async handlers", async_reference_app()),
        ("eom", "end-of-message-only app", build(eom_only=True)),
    ):
        if args.app and key not in args.app:
            continue
        best = asyncio.run(measure(app, args.transactions, args.rounds, args.body_size))
        print(f"{label:<36} {best:8.1f} us/message  (~{1e6 / best:,.0f} msgs/s of Python)")


if __name__ == "__main__":
    main()
