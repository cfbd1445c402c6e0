"""Helpers shared by the server tests: a running server, an MTA client, whole messages.

Not a test module. Every test drives a real :class:`MilterServer` over a real socket (loopback
or unix) with :class:`MtaClient`; nothing sleeps to synchronise: tests wait on events set by
handlers, on the milter's answers, or on the server's own timers.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable
from typing import Any, Final, TypeVar

import pytest

from milterapp.app import App
from milterapp.context import Context
from milterapp.events import (
    AddressFamily,
    Body,
    Connect,
    Data,
    EndOfHeaders,
    EndOfMessage,
    EnvFrom,
    EnvRcpt,
    Event,
    Header,
    Helo,
    Macros,
)
from milterapp.replies import AddHeader, Continue, Reject, TempFail
from milterapp.server import MilterServer
from milterapp.server.loops import loop_factory
from milterapp.testing import Answer, MtaClient

__all__ = [
    "CLIENT",
    "HELO",
    "LOOPBACK",
    "LOOPS",
    "TEST_TIMEOUT",
    "assert_serves",
    "connect",
    "message_events",
    "run",
    "running_server",
    "send",
    "send_message",
    "stamping_app",
    "start_session",
    "target",
    "until",
]

#: Bound of every test body: a server that does not answer fails the test, never hangs it.
TEST_TIMEOUT: Final = 20.0
#: Bound of every read of the MTA client.
CLIENT_TIMEOUT: Final = 5.0
#: Loopback, any free port.
LOOPBACK: Final = "inet:0@[127.0.0.1]"

try:
    import uvloop  # noqa: F401
except ImportError:
    UVLOOP = False
else:
    UVLOOP = True

#: The event loops a test runs on with ``@pytest.mark.parametrize("loop", LOOPS)`` and
#: ``run(..., loop=loop)``; uvloop's is skipped where it is not installed.
LOOPS: Final = [
    "asyncio",
    pytest.param(
        "uvloop",
        marks=pytest.mark.skipif(not UVLOOP, reason="uvloop is not installed (.[speed])"),
    ),
]

CLIENT: Final = Connect(
    hostname="client.example.com",
    family=AddressFamily.INET,
    port=41234,
    address=ipaddress.ip_address("192.0.2.10"),
)
HELO: Final = Helo(name="client.example.com")

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T], timeout: float = TEST_TIMEOUT, loop: str = "asyncio") -> T:
    """Run a test body in a fresh event loop (``loop``: asyncio or uvloop), bounded by
    ``timeout`` seconds."""

    async def bounded() -> T:
        async with asyncio.timeout(timeout):
            return await coro

    with asyncio.Runner(loop_factory=loop_factory(loop)) as runner:
        return runner.run(bounded())


@contextlib.asynccontextmanager
async def running_server(
    app: App, spec: str | None = LOOPBACK, **options: Any
) -> AsyncIterator[MilterServer]:
    """Start a server for ``app``; on exit shut it down gracefully and wait until closed."""
    server = MilterServer(app, spec=spec, **options)
    await server.start()
    try:
        yield server
    finally:
        app.shutdown()
        await server.wait_stopped()
        await server.close()


def target(server: MilterServer) -> str | tuple[str, int]:
    """What an MTA connects to for ``server``: ``(host, port)`` or ``unix:PATH``."""
    address = server.address
    if isinstance(address, tuple):
        return str(address[0]), int(address[1])
    return f"unix:{address}"


async def connect(server: MilterServer) -> MtaClient:
    """Connect an MTA client to ``server`` (not negotiated yet)."""
    return await MtaClient.connect(target(server), timeout=CLIENT_TIMEOUT)


async def send(client: MtaClient, event: Event) -> Answer | None:
    """Send ``event`` unless the milter asked not to receive it; return its answer if any."""
    if client.mta.suppressed(event):
        return None
    return await client.send(event)


async def start_session(client: MtaClient, *, client_event: Connect = CLIENT) -> None:
    """Negotiate, then CONNECT and HELO (when the milter wants them), all continued."""
    await client.negotiate()
    for event in (client_event, HELO):
        answer = await send(client, event)
        assert answer is None or isinstance(answer.verdict, Continue), answer


def message_events(
    *,
    sender: str = "alice@example.org",
    recipients: Iterable[str] = ("bob@example.net",),
    headers: Iterable[tuple[str, str]] = (("From", "alice@example.org"), ("Subject", "hello")),
    body: bytes = b"Hello, Bob.\r\n",
    mail_macros: dict[str, str] | None = None,
) -> list[Event]:
    """The commands of one message, from MAIL to the last body chunk (end of message apart).

    A ``D`` for MAIL comes first, as Postfix and Sendmail send it even when MAIL itself is
    suppressed: that is how the MTA (and :class:`MtaConnection`) begins a new message.
    """
    return [
        Macros(stage="M", values=mail_macros or {}),
        EnvFrom(address=sender),
        *(EnvRcpt(address=recipient) for recipient in recipients),
        Data(),
        *(Header(name=name, value=value) for name, value in headers),
        EndOfHeaders(),
        *([Body(chunk=body)] if body else []),
    ]


async def send_message(client: MtaClient, **message: Any) -> Answer:
    """Send one message as an MTA does; return the answer that ended it.

    That is the end-of-message answer, or the first verdict other than Continue before it
    (the MTA sends nothing more of a message that already has its verdict).
    """
    for event in message_events(**message):
        answer = await send(client, event)
        if answer is not None and not isinstance(answer.verdict, Continue):
            if isinstance(event, EnvRcpt) and isinstance(answer.verdict, Reject | TempFail):
                continue  # only this recipient is refused; the message goes on
            return answer
    answer = await client.send(EndOfMessage())
    assert answer is not None
    return answer


async def until(predicate: Callable[[], bool]) -> None:
    """Let the event loop run until ``predicate()`` holds (bounded by the test timeout).

    Only for state the server changes synchronously inside a task that is already scheduled
    (a close that has begun): each turn lets every ready callback run once.
    """
    # Not a timed sleep: sleep(0) yields one loop turn, so this only lets ready work run.
    while not predicate():  # noqa: ASYNC110 - the server offers no event for this state
        await asyncio.sleep(0)


def stamping_app(name: str = "listening") -> App:
    """An app that stamps every message with one header."""
    app = App(name)

    @app.on("eom")
    def stamp(event: EndOfMessage, ctx: Context) -> None:
        ctx.add_header("X-Stamp", name)

    return app


async def assert_serves(server: MilterServer, name: str = "listening") -> None:
    """Negotiate with ``server`` and get one message answered, stamped."""
    async with await connect(server) as client:
        await start_session(client)
        answer = await send_message(client)
    assert answer.modifications == [AddHeader(name="X-Stamp", value=name)]
    assert answer.verdict == Continue()
