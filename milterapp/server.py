"""The asyncio milter server: accept MTA connections and run each through the App.

Each connection is a :class:`~milterapp.session.ConnectionHandler` (an asyncio protocol)
driving a sans-IO :class:`~milterapp.protocol.machine.MilterConnection`: bytes read from the
MTA become events, events go through the App's handlers, replies go back as bytes. A protocol
error or a crash in one connection closes that connection only; the server goes on.
End-of-message handlers that take long are covered by progress packets, and a graceful
shutdown lets messages in flight finish (up to a grace period) before closing. Its options
are :class:`~milterapp.serveroptions.ServerOptions`.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import signal
import sys
from typing import Any, Final

import structlog
from pydantic import ValidationError

from milterapp.acceptor import Acceptor
from milterapp.app import App
from milterapp.errors import (
    MilterError,
    ServerError,
    ServerErrorKind,
    SetupError,
)
from milterapp.limits import (
    Limits,
)
from milterapp.listener import Listener, adopt, open_listener, systemd_socket
from milterapp.logconfig import LogFormat, configure_logging
from milterapp.loops import loop_factory, loop_name, run_in_loop
from milterapp.replies import NegotiationReply
from milterapp.serveroptions import (
    ServerOptions,
    default_remove_unix_socket_on_close,
    default_unix_socket_group,
    default_unix_socket_mode,
)
from milterapp.session import ConnectionHandler
from milterapp.spec import ConnectionSpec
from milterapp.transports import WriteBatch, peer_name

_READ_BUFFER_SIZE: Final = 256 * 1024

__all__ = [
    "MilterServer",
    "ServerOptions",
    "default_remove_unix_socket_on_close",
    "default_unix_socket_group",
    "default_unix_socket_mode",
    "run",
    "serve",
]


class MilterServer:
    """Serves one App on one listening socket.

    ``await start()``, then ``await wait_stopped()`` until :meth:`request_stop` (thread-safe,
    also what ``app.shutdown()`` calls), then ``await close()``.
    """

    def __init__(self, app: App, options: ServerOptions | None = None, **kwargs: Any) -> None:
        self.app = app
        if options is None:
            options = ServerOptions.model_validate(_parsed_spec(kwargs))
        self.options = options
        self.listener: Listener | None = None
        self._acceptor: Acceptor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop = asyncio.Event()
        self._stopping = False
        self._started = False
        self._closed = False
        self._connections: set[ConnectionHandler] = set()
        self._limits = Limits()
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

    def _open(self) -> Listener:
        options = self.options
        if options.listen_socket is not None:
            return adopt(options.listen_socket)
        if options.socket_activation and (inherited := systemd_socket()) is not None:
            return adopt(inherited)
        return open_listener(
            options.spec,
            backlog=options.backlog,
            unix_socket_mode=options.unix_socket_mode,
            unix_socket_group=options.unix_socket_group,
            remove_unix_socket_on_create=options.remove_unix_socket_on_create,
            remove_unix_socket_on_close=options.remove_unix_socket_on_close,
        )

    async def start(self) -> None:
        """Listen, run the app's startup hooks, then accept connections.

        Raises:
            ServerError: the app is already serving, or the socket cannot be opened.
            SetupError: a startup hook failed (the socket is closed and removed again).
        """
        if self.app._stop is not None:
            raise ServerError(
                f"app {self.app.name!r} is already serving; call app.shutdown() first",
                kind=ServerErrorKind.RUNNING,
            )

        self._loop = asyncio.get_running_loop()
        self._requirements = self.app.requirements()
        self.app._stop = self.request_stop
        try:
            self.listener = self._open()
            self.log = structlog.get_logger("milterapp").bind(
                app=self.app.name, listen=self.listener.description
            )
            try:
                await self.app.run_startup()
            except Exception as exc:
                raise SetupError(f"startup hook of {self.app.name!r} failed: {exc!r}") from exc
            options = self.options
            self._limits = Limits(
                timeout=options.timeout,
                read_timeout=options.read_timeout,
                write_timeout=options.write_timeout,
                max_macros_per_packet=options.max_macros_per_packet,
                max_headers=options.max_headers,
                max_header_size=options.max_header_size,
                max_recipients=options.max_recipients,
            )
            # Built once: binding a fresh lazy proxy per connection costs tens of microseconds.
            self._connection_log = structlog.get_logger("milterapp").bind()
            self._negotiations = {}
            self._writes = WriteBatch(self._loop)
            # Not loop.create_server: see milterapp.acceptor.
            self._acceptor = Acceptor(
                self._loop, self.listener.sock, self._new_connection, self.log
            )
            self._acceptor.start()
        except BaseException:
            self.app._stop = None
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

    def request_stop(self) -> None:
        """Ask for a graceful shutdown; safe from any thread and from signal handlers."""
        loop = self._loop
        if loop is None:  # not started yet: called from the thread that will start it
            self._stop.set()
            return
        if loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._stop.set()
        else:
            loop.call_soon_threadsafe(self._stop.set)

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
        if self._acceptor is not None:
            await self._acceptor.close()
        if self.listener is not None:
            # New connections are refused from now on, not left waiting in the backlog while
            # we drain: the MTA applies its own policy at once. (A unix socket's file stays
            # until the end, as it marks the socket ours.)
            self.listener.sock.close()
        for connection in list(self._connections):
            connection.stop()  # idle ones close now, the others after their message
        pending = {connection.done for connection in self._connections}
        if pending:
            self.log.info("draining", connections=len(pending))
            _, pending = await asyncio.wait(pending, timeout=self.options.shutdown_grace)
        if pending:
            for connection in list(self._connections):
                connection.abort()
            await asyncio.wait(pending)
        if self.listener is not None:
            self.listener.close()
        if self.app._stop == self.request_stop:  # not a newer server's
            self.app._stop = None
        self.log.info("stopped")
        await self.app.run_shutdown()

    # --- one connection ------------------------------------------------------------------

    def _new_connection(self) -> ConnectionHandler:
        return ConnectionHandler(
            self.app,
            self._requirements,
            conn_id=str(next(self._ids)),
            limits=self._limits,
            max_data_size=self.options.max_data_size,
            admit=self._admit,
            negotiations=self._negotiations,
            log=self._connection_log,
            read_buffer=self._read_buffer,
            writes=self._writes,
        )

    def _admit(self, handler: ConnectionHandler) -> bool:
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
    app: App,
    spec: str | ConnectionSpec | None = None,
    *,
    handle_signals: bool = False,
    **options: Any,
) -> None:
    """Serve ``app`` in the running event loop until ``app.shutdown()`` (or a signal).

    Args:
        spec: where to listen; None for the loopback default.
        handle_signals: stop gracefully on SIGTERM and SIGINT (main thread only).
        **options: any field of :class:`ServerOptions`.
    """
    server = MilterServer(
        app, ServerOptions.model_validate(_parsed_spec({"spec": spec, **options}))
    )
    loop = asyncio.get_running_loop()
    signals = (signal.SIGTERM, signal.SIGINT) if handle_signals else ()
    # Before start(): a signal that arrives while starting still stops the server cleanly.
    for signum in signals:
        loop.add_signal_handler(signum, server.request_stop)
    try:
        await server.start()
        await server.wait_stopped()
    finally:
        for signum in signals:
            loop.remove_signal_handler(signum)
        await server.close()


def _parsed_spec(options: dict[str, Any]) -> dict[str, Any]:
    """Parse a spec string first, so a bad one raises ConnectionSpecError itself (one clear
    line), not wrapped in a pydantic ValidationError."""
    spec = options.get("spec")
    if isinstance(spec, str):
        return {**options, "spec": ConnectionSpec.parse(spec)}
    return options


def _one_line(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(part) for part in error['loc']) or 'options'}: {error['msg']}"
        for error in exc.errors()
    )


def _spec_from_argv(argv: list[str]) -> str | None:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--spec")
    known, _ = parser.parse_known_args(argv)
    spec: str | None = known.spec
    return spec


def run(
    app: App,
    spec: str | ConnectionSpec | None = None,
    *,
    workers: int = 1,
    log_format: LogFormat = "text",
    log_level: str = "INFO",
    loop: str = "auto",
    **options: Any,
) -> None:
    """Serve ``app`` until SIGTERM or SIGINT; for scripts.

    ``spec`` defaults to ``--spec`` on the command line, then ``$MILTERAPP_SPEC``, then the
    loopback default. Configures logging (key=value on stderr, or JSON). A setup problem
    (bad spec, address in use, failing startup hook) is one line on stderr and exit code 1.
    ``workers`` above 1 forks that many processes to serve the socket (Linux; see
    :mod:`milterapp.workers`). ``loop`` picks the event loop: ``auto`` (uvloop when
    installed), ``asyncio`` or ``uvloop`` (see :mod:`milterapp.loops`).
    """
    configure_logging(log_format, log_level)
    spec = spec or _spec_from_argv(sys.argv[1:]) or os.environ.get("MILTERAPP_SPEC") or None
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        message = f"workers: must be a whole number, at least 1 (not {workers!r})"
        print(f"milterapp: error: invalid option: {message}", file=sys.stderr)
        raise SystemExit(1)
    try:
        loop_factory(loop)  # an unknown loop, or uvloop missing: fail before anything starts
        if workers == 1:
            run_in_loop(serve(app, spec, handle_signals=True, **options), loop)
            return
        from milterapp.workers import run_workers  # deferred: workers builds on this module

        server_options = ServerOptions.model_validate(_parsed_spec({"spec": spec, **options}))
        status = run_workers(app, server_options, workers, loop=loop)
    except MilterError as exc:
        print(f"milterapp: error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    except ValidationError as exc:  # pydantic validation of the options
        print(f"milterapp: error: invalid option: {_one_line(exc)}", file=sys.stderr)
        raise SystemExit(1) from None
    if status:
        raise SystemExit(status)
