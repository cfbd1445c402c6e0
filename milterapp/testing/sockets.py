"""Tools for testing milters: play the MTA against any milter over a real socket.

:class:`MtaClient` speaks the MTA's side of the protocol (through the same codec and an
MTA-side state machine, :class:`~milterapp.protocol.mta.MtaConnection`) to a milter listening
at a connection spec: ours or one written in any other language.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Iterable
from types import TracebackType
from typing import Any, Self

from milterapp.app import App
from milterapp.chain.link import open_stream
from milterapp.errors import ProtocolError
from milterapp.events import Event, Negotiate, Quit
from milterapp.protocol.mta import DEFAULT_OFFER, Answer, MtaConnection
from milterapp.replies import NegotiationReply
from milterapp.server.server import MilterServer
from milterapp.spec import ConnectionSpec
from milterapp.testing.pipe import READ_SIZE

__all__ = ["Answer", "MtaClient", "ServerThread", "bound_spec", "serving"]

#: Where :func:`serving` listens by default: any free loopback port.
_ANY_LOOPBACK_PORT = "inet:0@[127.0.0.1]"


def bound_spec(server: MilterServer) -> str:
    """The spec that reaches a started server (its port 0 resolved): for ``use_milter`` or
    :meth:`MtaClient.connect`."""
    address = server.address
    if isinstance(address, str):
        return f"unix:{address}"
    host, port = address[0], address[1]
    return f"{'inet6' if ':' in host else 'inet'}:{port}@[{host}]"


@contextlib.asynccontextmanager
async def serving(app: App, spec: str = _ANY_LOOPBACK_PORT, **options: Any) -> AsyncIterator[str]:
    """Serve ``app`` in the running event loop while the block runs; yield its spec.

    For an app's upstream milters in a test, in memory::

        async with serving(upstream_app) as spec:
            front.use_milter(spec, name="upstream")
            async with AsyncMilterTestClient(front) as client:
                ...

    The server stops gracefully when the block ends.
    """
    server = MilterServer(app, spec=spec, **options)
    await server.start()
    try:
        yield bound_spec(server)
    finally:
        server.request_stop()
        await server.wait_stopped()
        await server.close()


class MtaClient:
    """An MTA connected to a milter: send commands, get the milter's answers.

    Use :meth:`connect`; every read is bounded by ``timeout`` seconds, so a milter that does
    not answer fails the test instead of hanging it.
    """

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        offer: Negotiate = DEFAULT_OFFER,
        timeout: float = 10.0,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.mta = MtaConnection(offer)
        self.timeout = timeout

    @classmethod
    async def connect(
        cls,
        target: str | ConnectionSpec | tuple[str, int],
        *,
        offer: Negotiate = DEFAULT_OFFER,
        timeout: float = 10.0,  # noqa: ASYNC109 - also kept as the bound of every later read
    ) -> Self:
        """Connect to a milter at a spec (``inet:10025@[127.0.0.1]``, ``unix:/path``) or
        a ``(host, port)`` pair."""
        async with asyncio.timeout(timeout):
            if isinstance(target, tuple):
                reader, writer = await asyncio.open_connection(*target)
            else:
                spec = ConnectionSpec.parse(target) if isinstance(target, str) else target
                reader, writer = await open_stream(spec)
        return cls(reader, writer, offer=offer, timeout=timeout)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def negotiate(self) -> NegotiationReply:
        """Send the offer and return the milter's negotiation reply."""
        await self.send(self.mta.offer)
        reply = self.mta.reply
        assert reply is not None
        return reply

    async def send(self, event: Event, *, force: bool = False) -> Answer | None:
        """Send one command; return the milter's answer, or None if it owes none."""
        self.writer.write(self.mta.send(event, force=force))
        await self.writer.drain()
        if not self.mta.awaiting_reply:
            return None
        return await self.answer()

    async def send_all(self, events: Iterable[Event]) -> list[Answer | None]:
        """Send commands one by one, as an MTA does; return each one's answer."""
        return [await self.send(event) for event in events]

    async def answer(self) -> Answer:
        """Read until the milter's whole answer (modifications, verdict) is in."""
        while (answer := self.mta.collect_answer()) is None:
            await self._read()
        return answer

    async def _read(self) -> None:
        async with asyncio.timeout(self.timeout):
            data = await self.reader.read(READ_SIZE)
        self.mta.receive_data(data)

    async def closed_by_milter(self) -> bool:
        """Wait (up to the timeout) for the milter to close the connection.

        A reset counts: a milter that closes with commands unread (ones that need no reply,
        sent just before) makes the kernel answer with a reset rather than an end of file.
        """
        try:
            async with asyncio.timeout(self.timeout):
                data = await self.reader.read(READ_SIZE)
        except ConnectionResetError:
            return True
        except (ConnectionError, TimeoutError):
            return False
        return not data

    async def close(self, *, quit: bool = True) -> None:
        """Send QUIT (unless told not to, or the state forbids it) and close the socket."""
        # Closing must not fail a test that passed: the milter may be gone already, the
        # state may forbid QUIT (a reply still owed), or our side may be shut for writing.
        if quit and not self.writer.is_closing():
            with contextlib.suppress(ProtocolError, OSError, RuntimeError):
                self.writer.write(self.mta.send(Quit()))
                await self.writer.drain()
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


class ServerThread:
    """Serve an App in a background thread, for tests that drive it with blocking clients
    (``smtplib`` through a real MTA, say).

    ::

        with ServerThread(app, "inet:0@[127.0.0.1]") as server:
            host, port = server.address
            ...  # the server stops gracefully when the block ends

    Args:
        app: the App to serve.
        spec: where to listen (port 0: any free port).
        **options: any field of :class:`milterapp.server.ServerOptions`.
    """

    def __init__(self, app: App, spec: str | None = None, **options: Any) -> None:
        self.server = MilterServer(app, spec=spec, **options)
        self._thread = threading.Thread(target=self._run, name=f"milter-{app.name}", daemon=True)
        self._started = threading.Event()
        self._error: BaseException | None = None

    @property
    def address(self) -> Any:
        """The bound address: ``(host, port)`` for inet, the path for unix."""
        return self.server.address

    @property
    def spec(self) -> str:
        """The spec that reaches the server (see :func:`bound_spec`)."""
        return bound_spec(self.server)

    def _run(self) -> None:
        async def main() -> None:
            try:
                await self.server.start()
            except BaseException as exc:
                self._error = exc
                raise
            finally:
                self._started.set()
            try:
                await self.server.wait_stopped()
            finally:
                await self.server.close()

        with contextlib.suppress(BaseException):
            asyncio.run(main())

    def __enter__(self) -> Self:
        self._thread.start()
        self._started.wait()
        if self._error is not None:
            self._thread.join()
            raise self._error
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def stop(self, timeout: float = 60.0) -> None:
        """Shut the server down gracefully and wait for its thread."""
        self.server.request_stop()
        self._thread.join(timeout)
