"""The asyncio milter server: accept MTA connections on one socket and serve each.

Each connection is a :class:`~milterapp.server.connection.Connection` (an asyncio protocol)
driving a sans-IO :class:`~milterapp.protocol.machine.MilterConnection`: bytes read from the
MTA become events, events go through the app's handlers, replies go back as bytes. A protocol
error or a crash in one connection closes that connection only; the server goes on. A
graceful shutdown lets messages in flight finish (up to a grace period) before closing; a
reload runs the app's reload hooks while connections go on. Its options are
:class:`~milterapp.server.options.ServerOptions`; scripts start it through
:func:`milterapp.server.main.run`, which also tells systemd how it goes
(:mod:`milterapp.server.notify`).
"""

from __future__ import annotations

import asyncio
import itertools
import signal
from collections.abc import Callable
from typing import Any, Final

import structlog

from milterapp.errors import SetupError
from milterapp.replies import NegotiationReply
from milterapp.server.acceptor import Acceptor
from milterapp.server.connection import Connection, peer_name
from milterapp.server.listener import Listener, listen
from milterapp.server.loops import loop_name
from milterapp.server.metrics import Metrics
from milterapp.server.notify import Notifier
from milterapp.server.options import ServerOptions
from milterapp.server.servable import Servable
from milterapp.server.writes import WriteBatch
from milterapp.spec import ConnectionSpec

__all__ = ["MilterServer", "serve"]

_READ_BUFFER_SIZE: Final = 256 * 1024


class MilterServer:
    """Serves one App on one listening socket.

    ``await start()``, then ``await wait_stopped()`` until :meth:`request_stop` (thread-safe,
    also what ``app.shutdown()`` calls), then ``await close()``. :meth:`request_reload` runs
    the reload hooks. ``notifier`` is told when the server is ready, reloads and stops (by
    default nobody: :func:`serve` gives systemd's when it owns the process).
    """

    def __init__(
        self,
        app: Servable,
        options: ServerOptions | None = None,
        *,
        notifier: Notifier | None = None,
        metrics: Metrics | None = None,
        **kwargs: Any,
    ) -> None:
        self.app = app
        self.metrics = metrics
        if options is None:
            options = ServerOptions.from_spec(**kwargs)
        self.options = options
        self.notifier = notifier if notifier is not None else Notifier()
        self._status = "starting"  # systemd's STATUS= line
        self._reloading: asyncio.Task[None] | None = None
        self._reload_wanted = False
        self._watchdog: asyncio.TimerHandle | None = None
        self.listener: Listener | None = None
        self._acceptor: Acceptor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop = asyncio.Event()
        self._stopping = False
        self._started = False
        self._closed = False
        self._connections: set[Connection] = set()
        self._negotiations: dict[tuple[int, int, int], NegotiationReply] = {}
        self._connection_log: Any = None
        # One read buffer for every connection: each read is consumed before the next one.
        self._read_buffer = bytearray(_READ_BUFFER_SIZE)
        self._writes: WriteBatch | None = None
        self._ids = itertools.count(1)
        self._requirements = app.requirements()  # again in start(), after registration
        self.log: Any = structlog.get_logger("milterapp").bind(app=app.name)

    @property
    def address(self) -> Any:
        """The bound address: ``(host, port)`` for inet, the path for unix."""
        assert self.listener is not None, "the server is not started"
        return self.listener.sock.getsockname()

    async def start(self) -> None:
        """Listen, run the app's startup hooks, then accept connections.

        Raises:
            ServerError: the app is already serving, or the socket cannot be opened.
            SetupError: a startup hook failed (the socket is closed and removed again).
        """
        self.app.serving.attach(self.request_stop, self.request_reload)
        self._loop = asyncio.get_running_loop()
        self._requirements = self.app.requirements()
        try:
            self.listener = listen(self.options)
            self.log = structlog.get_logger("milterapp").bind(
                app=self.app.name, listen=self.listener.description
            )
            try:
                await self.app.run_startup()
            except Exception as exc:
                raise SetupError(f"startup hook of {self.app.name!r} failed: {exc!r}") from exc
            # Built once: binding a fresh lazy proxy per connection costs tens of microseconds.
            self._connection_log = structlog.get_logger("milterapp").bind()
            self._negotiations = {}
            self._writes = WriteBatch(self._loop)
            # Not loop.create_server: see milterapp.server.acceptor.
            self._acceptor = Acceptor(
                self._loop, self.listener.sock, self._new_connection, self.log
            )
            self._acceptor.start()
        except BaseException:
            self.app.serving.detach(self.request_stop)
            if self.listener is not None:
                self.listener.remove_on_close = True  # we made it; a failed start leaves none
                self.listener.close()
                self.listener = None
            raise
        self._started = True
        self.log.info("listening", loop=loop_name(self._loop))
        mode = self.options.unix_socket_mode
        if self.listener.unix_path is not None and mode & 0o006:
            # Anyone on the host who can reach the path may then feed mail to the milter.
            self.log.warning("unix_socket_open_to_others", mode=f"{mode:03o}")
        self._status = f"serving {self.listener.description}"
        if self.metrics is not None:
            self.metrics.accepting = True
            self.metrics.start(self._loop)
        self.notifier.ready(self._status)
        self._ping_watchdog()
        if self._reload_wanted:  # asked for while starting: the hooks may have read old state
            self._reload_soon()

    def request_stop(self) -> None:
        """Ask for a graceful shutdown; safe from any thread and from signal handlers."""
        self._in_loop(self._stop.set)

    def request_reload(self) -> None:
        """Ask for the app's reload hooks to run (what SIGHUP does); safe from any thread and
        from signal handlers. Asked again while they run, they run once more afterwards."""
        self._in_loop(self._reload_soon)

    def _in_loop(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` in the server's loop: now if called from it, else thread-safely."""
        loop = self._loop
        if loop is None:  # not started yet: called from the thread that will start it
            callback()
            return
        if loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            callback()
        else:
            loop.call_soon_threadsafe(callback)

    def _reload_soon(self) -> None:
        if self._stopping:
            return
        if not self._started or self._reloading is not None:
            self._reload_wanted = True  # start() or the running round picks it up: coalesced
            return
        assert self._loop is not None
        self._reloading = self._loop.create_task(self._reload())

    async def _reload(self) -> None:
        """Run the reload hooks, once more for each burst of requests that came meanwhile.

        A task of its own: connections are served while an async hook awaits.
        """
        self.notifier.reloading()
        try:
            while True:
                self._reload_wanted = False
                ran, failed = await self.app.run_reload()
                self.log.info("reload", hooks=ran, failed=failed)
                if not self._reload_wanted or self._stopping:
                    break
        finally:
            self._reloading = None
        if not self._stopping:
            self.notifier.ready(self._status)

    def _ping_watchdog(self) -> None:
        """Tell systemd we are alive, and again every interval: from the event loop, so a
        loop blocked by a handler misses its pings and systemd restarts the milter."""
        interval = self.notifier.watchdog_interval
        if interval is None or self._closed or self._loop is None:
            return
        self.notifier.watchdog()
        self._watchdog = self._loop.call_later(interval, self._ping_watchdog)

    async def wait_stopped(self) -> None:
        """Return once a stop has been requested."""
        await self._stop.wait()

    async def close(self) -> None:
        """Stop accepting, let messages in flight finish (grace period), then clean up.

        Does nothing if the server did not start, or was closed already.
        """
        if not self._started or self._closed:
            return
        self._closed = True
        self._stopping = True
        if self.metrics is not None:
            self.metrics.accepting = False  # /healthz: 503 while draining
        self.notifier.stopping()
        if self._acceptor is not None:
            await self._acceptor.close()
        if self.listener is not None:
            # New connections are refused from now on, not left waiting in the backlog while
            # we drain: the MTA applies its own policy at once. (A unix socket's file stays
            # until the end, as it marks the socket ours.)
            self.listener.sock.close()
        for connection in list(self._connections):
            connection.stop()  # idle ones close now, the others after their message
        pending: set[asyncio.Future[None]] = {connection.done for connection in self._connections}
        if pending:
            self.log.info("draining", connections=len(pending))
        if self._reloading is not None:  # the shutdown hooks run after a reload, not during it
            pending.add(self._reloading)
        if pending:
            _, pending = await asyncio.wait(pending, timeout=self.options.shutdown_grace)
        if pending:
            for connection in list(self._connections):
                connection.abort()
            if self._reloading is not None:
                self._reloading.cancel()
            await asyncio.wait(pending)
        if self.listener is not None:
            self.listener.close()
        if self._watchdog is not None:
            self._watchdog.cancel()
        self.notifier.close()
        self.app.serving.detach(self.request_stop)
        if self.metrics is not None:
            self.metrics.stop()  # what is left goes to prometheus_client
        self.log.info("stopped")
        await self.app.run_shutdown()

    # --- one connection ------------------------------------------------------------------

    def _new_connection(self) -> Connection:
        return Connection(
            self.app,
            self._requirements,
            conn_id=str(next(self._ids)),
            limits=self.options.limits,
            max_data_size=self.options.max_data_size,
            admit=self._admit,
            negotiations=self._negotiations,
            log=self._connection_log,
            read_buffer=self._read_buffer,
            writes=self._writes,
            metrics=self.metrics,
        )

    def _admit(self, handler: Connection) -> bool:
        """Track a new connection, or refuse it (over ``max_connections``, or stopping)."""
        if self._stopping:
            return False
        limit = self.options.max_connections
        if limit and len(self._connections) >= limit:
            # Closed before negotiation: the MTA applies its failure policy (Postfix:
            # milter_default_action, tempfail by default).
            assert handler.transport is not None
            self.log.warning(
                "connection_refused_limit",
                connections=len(self._connections),
                limit=limit,
                peer=peer_name(handler.transport),
            )
            return False
        self._connections.add(handler)
        handler.done.add_done_callback(lambda _: self._connections.discard(handler))
        return True


async def serve(
    app: Servable,
    spec: str | ConnectionSpec | None = None,
    *,
    handle_signals: bool = False,
    notifier: Notifier | None = None,
    metrics: Metrics | None = None,
    **options: Any,
) -> None:
    """Serve ``app`` in the running event loop until ``app.shutdown()`` (or a signal).

    Args:
        spec: where to listen; None for the loopback default.
        handle_signals: own the process (main thread only): stop gracefully on SIGTERM and
            SIGINT, run the reload hooks on SIGHUP, and tell systemd how the server goes
            when ``$NOTIFY_SOCKET`` is set. Embedded (False), none of that happens.
        notifier: whom to tell instead (a worker tells its parent).
        metrics: where to count what happens (``--metrics``), if anywhere.
        **options: any field of :class:`ServerOptions`.
    """
    if notifier is None:
        notifier = Notifier.from_environment() if handle_signals else Notifier()
    server = MilterServer(
        app, ServerOptions.from_spec(spec, **options), notifier=notifier, metrics=metrics
    )
    loop = asyncio.get_running_loop()
    signals = (signal.SIGTERM, signal.SIGINT) if handle_signals else ()
    # Before start(): a signal that arrives while starting still stops the server cleanly.
    for signum in signals:
        loop.add_signal_handler(signum, server.request_stop)
    if handle_signals:
        loop.add_signal_handler(signal.SIGHUP, server.request_reload)
        # A worker starts with SIGHUP blocked, so that a reload asked for meanwhile waits for
        # this handler instead of killing it (SIGHUP's default): from here it is handled.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
    try:
        await server.start()
        await server.wait_stopped()
    finally:
        for signum in signals:
            loop.remove_signal_handler(signum)
        try:
            await server.close()
        finally:
            if handle_signals:  # only now: a SIGHUP while draining is ignored, not fatal
                loop.remove_signal_handler(signal.SIGHUP)
