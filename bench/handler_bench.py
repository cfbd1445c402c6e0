"""Connection handler benchmark: microseconds of Python per message, without sockets.

The server's own :class:`~milterapp.server.connection.Connection` is given a transport that
keeps nothing, and the transaction of ``protocol_bench.py`` is fed to it one MTA write at a
time (a macro packet and its command together), through ``get_buffer()`` and
``buffer_updated()`` as the event loop does after each read.
This is the framework's whole cost per message (codec, state machine, context, dispatch,
replies), apart from the event loop and the system calls; the load generator measures those.

``--messages-per-connection N`` opens a new connection every N messages, as Postfix does for
each SMTP session (N=1 for most), so that the connection's own cost counts: its objects,
negotiation, connect, helo, quit and close.

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

import structlog
from protocol_bench import SETUP, transaction
from refmilter import build

from milterapp import Accept, App
from milterapp.events import Abort, Event, Macros, Quit
from milterapp.protocol.codec import encode_command
from milterapp.protocol.stages import BY_EVENT
from milterapp.server.connection import Connection
from milterapp.server.logsetup import configure_logging


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


def asked_of(app: App, events: list[Event]) -> list[Event]:
    """The events the MTA sends this app: those it cannot be asked to leave out (negotiation,
    macros, end of message, abort, quit) and those the app asked for."""
    asked = app.requirements().events
    return [
        e
        for e in events
        if isinstance(e, Macros)
        or not BY_EVENT[type(e)].suppress
        or BY_EVENT[type(e)].name in asked
    ]


async def feed(handler: Connection, writes: list[bytes]) -> None:
    """The MTA's writes, read through get_buffer() and buffer_updated() as the event loop
    reads them; an async handler's task is let finish, one turn of the loop at a time."""
    for data in writes:
        size = len(data)
        handler.get_buffer(-1)[:size] = data
        handler.buffer_updated(size)
        while handler._task is not None:  # noqa: ASYNC110
            await asyncio.sleep(0)


async def measure(
    app: App, count: int, rounds: int, body_size: int, per_connection: int = 0
) -> float:
    """Best microseconds per message; ``per_connection`` messages on each connection (its
    set-up, negotiation, connect, helo, quit and close included), or one connection for all."""
    # Postfix aborts after each message, then reuses the connection.
    writes = writes_of(asked_of(app, [*transaction(body_size), Abort()]))
    read_buffer = bytearray(256 * 1024)
    requirements = app.requirements()
    # What the server shares between its connections: its negotiations by offer, its logger.
    shared: dict[str, Any] = {
        "read_buffer": read_buffer,
        "negotiations": {},
        "log": structlog.get_logger("milterapp").bind(),
    }
    best = float("inf")
    if per_connection:
        opening = writes_of(asked_of(app, SETUP))
        closing = writes_of([Quit()])
        for _ in range(rounds):
            start = time.perf_counter()
            for _ in range(count // per_connection):
                handler = Connection(app, requirements, **shared)
                handler.connection_made(NullTransport())
                await feed(handler, opening)
                for _ in range(per_connection):
                    await feed(handler, writes)
                await feed(handler, closing)
                handler.connection_lost(None)
                await handler.done
                assert handler.error is None, handler.error
            elapsed = time.perf_counter() - start
            best = min(best, elapsed / (count // per_connection * per_connection) * 1e6)
        return best
    handler = Connection(app, requirements, **shared)
    handler.connection_made(NullTransport())
    await feed(handler, writes_of(SETUP))
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(count):
            await feed(handler, writes)
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
    parser.add_argument(
        "--messages-per-connection",
        type=int,
        default=0,
        metavar="N",
        help="a new connection every N messages (its set-up, negotiation and close counted); "
        "0 (the default): one connection for all",
    )
    args = parser.parse_args()
    # As the server runs by default (WARNING): no line per message.
    configure_logging(level="WARNING")
    print(f"python {platform.python_version()} on {platform.machine()}, best of {args.rounds}")
    for key, label, app in (
        ("plain", "reference app, plain handlers", build()),
        ("async", "reference app, async handlers", async_reference_app()),
        ("eom", "end-of-message-only app", build(eom_only=True)),
    ):
        if args.app and key not in args.app:
            continue
        best = asyncio.run(
            measure(
                app, args.transactions, args.rounds, args.body_size, args.messages_per_connection
            )
        )
        print(f"{label:<36} {best:8.1f} us/message  (~{1e6 / best:,.0f} msgs/s of Python)")


if __name__ == "__main__":
    main()
