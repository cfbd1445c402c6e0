"""Worker processes: N forked processes serve one listening socket (Linux only).

The parent opens the socket once (and alone removes a unix socket file at the end), then
forks the workers. Each worker runs the app's startup hooks, serves the inherited socket
with asyncio as a single-process server does, and runs the shutdown hooks when it stops.
The parent only supervises: a worker that dies is logged (``worker_died``) and replaced,
with a growing delay while workers die young; after more than ``MAX_FAST_DEATHS`` such
deaths in a row it stops everything and exits 1. SIGTERM or SIGINT to the parent is passed
to every worker as SIGTERM; they drain gracefully, then the socket is closed and removed.
SIGHUP is passed on as it is: each worker runs the app's reload hooks.

Under systemd (``$NOTIFY_SOCKET``) the parent alone talks to it, as the main process: each
worker reports to the parent with a queued signal once it serves (after starting, after a
reload), and the parent sends ``READY=1`` once every worker has; it sends the watchdog pings.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final, NoReturn

import structlog

from milterapp.errors import MilterError, SetupError
from milterapp.server.listener import Listener, listen
from milterapp.server.loops import run_in_loop
from milterapp.server.metrics import (
    Metrics,
    MetricsEndpoint,
    multiprocess_directory,
    worker_gone,
)
from milterapp.server.notify import Notifier
from milterapp.server.options import ServerOptions
from milterapp.server.servable import Servable
from milterapp.server.server import serve

__all__ = ["MAX_FAST_DEATHS", "YOUNG", "run_workers"]

#: A worker that dies less than this many seconds after it started died young.
YOUNG: Final = 1.0
#: More young deaths in a row than this is a crash loop: the parent gives up.
MAX_FAST_DEATHS: Final = 5
#: Seconds the parent waits beyond ``shutdown_grace`` before it SIGKILLs a worker.
_KILL_MARGIN: Final = 10.0
_STOP_SIGNALS: Final = frozenset({signal.SIGTERM, signal.SIGINT})
#: What a worker sends its parent once it serves: a real-time signal, as those queue (one per
#: worker) where two SIGUSR1s at once would merge into one. (Only Linux runs workers.)
_WORKER_READY: Final = signal.SIGRTMIN if sys.platform == "linux" else signal.SIGUSR2
_SIGNALS: Final = _STOP_SIGNALS | {signal.SIGCHLD, signal.SIGHUP, _WORKER_READY}


@dataclass
class _Worker:
    slot: int
    started: float


def run_workers(
    app: Servable,
    options: ServerOptions,
    count: int,
    *,
    loop: str = "auto",
    metrics: str | None = None,
) -> int:
    """Serve ``app`` with ``count`` worker processes until SIGTERM or SIGINT.

    ``metrics``: serve at ``HOST:PORT`` the sum of the workers' metrics (and ``/healthz``),
    from this process.

    Returns the exit status: 0 after a graceful stop, 1 after a crash loop.

    Raises:
        SetupError: not on Linux.
        ServerError: the socket cannot be opened.
    """
    if sys.platform != "linux":
        raise SetupError("workers > 1 needs Linux (fork() and sigwaitinfo()); use workers=1")
    listener = listen(options)  # opened once, as a single-process server opens it
    directory = None
    if metrics:
        # Before prometheus_client is first imported here and before any fork: it picks
        # where values live once, at import.
        directory = tempfile.mkdtemp(prefix="milterapp-metrics-")
        multiprocess_directory(directory)
    # Blocked signals wait for sigwaitinfo(): none is lost between fork() and the wait.
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
    # The lifeline: workers read a pipe whose write end only this process holds. When it dies,
    # even by SIGKILL, the kernel closes that end, and every worker sees end of file and stops.
    lifeline = os.pipe()
    supervisor = _Supervisor(app, options, listener, count, old_mask, loop, lifeline)
    supervisor.metrics = directory is not None
    endpoint = None
    try:
        if metrics:
            endpoint = MetricsEndpoint(metrics, None, lambda: not supervisor.stopping)
        return supervisor.run()
    except BaseException:
        supervisor.stop_workers()  # never leave workers behind, whatever went wrong
        raise
    finally:
        listener.close()
        supervisor.notifier.close()
        if endpoint is not None:
            endpoint.close()
        if directory is not None:
            shutil.rmtree(directory, ignore_errors=True)
        for fd in lifeline:
            os.close(fd)
        while signal.sigtimedwait(_SIGNALS, 0) is not None:
            pass  # a second SIGTERM or Ctrl-C during the stop must not kill us once unblocked
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)


class _Supervisor:
    def __init__(
        self,
        app: Servable,
        options: ServerOptions,
        listener: Listener,
        count: int,
        old_mask: Iterable[int],
        loop: str = "auto",
        lifeline: tuple[int, int] | None = None,
    ) -> None:
        self.app = app
        self.loop = loop
        self.lifeline = lifeline
        self.options = options
        self.listener = listener
        self.count = count
        self.old_mask = old_mask
        self.workers: dict[int, _Worker] = {}
        self.metrics = False  # workers count into files (multiprocess mode)
        self.stopping = False  # /healthz: 503 from here
        self.restarts: list[tuple[float, int]] = []  # (when, slot)
        self.young_deaths = 0
        self.log: Any = structlog.get_logger("milterapp").bind(
            app=app.name, listen=listener.description
        )
        self.notifier = Notifier.from_environment()
        # The workers whose report the parent waits for before READY=1; None: not waiting.
        self.awaiting: set[int] | None = set() if self.notifier.enabled else None
        interval = self.notifier.watchdog_interval
        self.watchdog_at = None if interval is None else time.monotonic()

    def run(self) -> int:
        self.log.info("workers_starting", workers=self.count)
        for slot in range(1, self.count + 1):
            self._spawn(slot)
        while True:
            self._ping_watchdog()
            info = self._wait(self._next_deadline())
            if info is not None and info.si_signo in _STOP_SIGNALS:
                self.log.info("stopping", signal=signal.Signals(info.si_signo).name)
                self.notifier.stopping()
                self.stop_workers()
                self.log.info("stopped")
                return 0
            if info is not None and info.si_signo == signal.SIGHUP:
                self._reload()
            elif info is not None and info.si_signo == _WORKER_READY:
                self._worker_ready(info.si_pid)
            self._reap()
            if self.young_deaths > MAX_FAST_DEATHS:
                self.stop_workers()
                print(
                    f"milterapp: error: workers died within {YOUNG:g} s of starting "
                    f"{self.young_deaths} times in a row; stopping (see the log above)",
                    file=sys.stderr,
                )
                return 1
            self._restart_due()

    def _wait(self, deadline: float | None) -> signal.struct_siginfo | None:
        if deadline is None:
            return signal.sigwaitinfo(_SIGNALS)
        return signal.sigtimedwait(_SIGNALS, max(0.0, deadline - time.monotonic()))

    def _next_deadline(self) -> float | None:
        due = [when for when, _ in self.restarts]
        if self.watchdog_at is not None:
            due.append(self.watchdog_at)
        return min(due, default=None)

    def _ping_watchdog(self) -> None:
        # Proves the supervisor alive only: a stuck worker is for the MTA's timeouts to notice.
        interval = self.notifier.watchdog_interval
        if interval is None or self.watchdog_at is None or time.monotonic() < self.watchdog_at:
            return
        self.notifier.watchdog()
        self.watchdog_at = time.monotonic() + interval

    def _reload(self) -> None:
        """SIGHUP: pass it to every worker; READY=1 again once each has reloaded."""
        self.log.info("reloading", signal="SIGHUP", workers=len(self.workers))
        if self.notifier.enabled:
            if self.awaiting is None:  # not still starting
                self.notifier.reloading()
            self.awaiting = set(self.workers)
        for pid in self.workers:
            _signal(pid, signal.SIGHUP)

    def _worker_ready(self, pid: int) -> None:
        if self.awaiting is None or pid not in self.awaiting:
            return
        self.awaiting.discard(pid)
        if not self.awaiting:
            self.awaiting = None
            status = f"serving {self.listener.description} with {self.count} workers"
            self.notifier.ready(status, main_pid=os.getpid())

    def _reap(self) -> None:
        """Collect every worker that exited; schedule its replacement."""
        while self.workers:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                return
            worker = self.workers.pop(pid, None)
            if worker is None:
                continue
            if self.metrics:
                worker_gone(pid)
            if self.awaiting is not None:
                self.awaiting.discard(pid)  # its replacement reports instead
            lived = time.monotonic() - worker.started
            self.young_deaths = self.young_deaths + 1 if lived < YOUNG else 0
            delay = min(0.1 * 2 ** (self.young_deaths - 1), 2.0) if self.young_deaths else 0.0
            self.log.warning(
                "worker_died",
                pid=pid,
                worker=worker.slot,
                status=_describe(status),
                lived=round(lived, 3),
                restart_in=delay,
            )
            self.restarts.append((time.monotonic() + delay, worker.slot))

    def _restart_due(self) -> None:
        now = time.monotonic()
        due = [slot for when, slot in self.restarts if when <= now]
        self.restarts = [(when, slot) for when, slot in self.restarts if when > now]
        for slot in due:
            self._spawn(slot)

    def _spawn(self, slot: int) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the worker; coverage does not follow fork()
            notifier = _ParentNotifier(parent) if self.notifier.enabled else Notifier()
            _worker_main(
                self.app,
                self.options,
                self.listener,
                slot,
                self.old_mask,
                self.loop,
                self.lifeline,
                notifier,
                self.metrics,
            )
        self.workers[pid] = _Worker(slot, time.monotonic())
        if self.awaiting is not None:
            self.awaiting.add(pid)
        self.log.info("worker_started", pid=pid, worker=slot)

    def stop_workers(self) -> None:
        """SIGTERM every worker and wait until all have exited (SIGKILL after the grace)."""
        self.stopping = True
        self.restarts.clear()
        for pid in self.workers:
            _signal(pid, signal.SIGTERM)
        deadline: float | None = time.monotonic() + self.options.shutdown_grace + _KILL_MARGIN
        while self.workers:
            for pid in list(self.workers):
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    del self.workers[pid]
                    if status:
                        self.log.warning("worker_exit", pid=pid, status=_describe(status))
            if not self.workers:
                return
            if deadline is None:
                signal.sigwaitinfo({signal.SIGCHLD})
            elif (remaining := deadline - time.monotonic()) > 0:
                signal.sigtimedwait({signal.SIGCHLD}, remaining)
            else:
                for pid in self.workers:
                    self.log.warning("worker_killed", pid=pid)
                    _signal(pid, signal.SIGKILL)
                deadline = None


def _worker_main(
    app: Servable,
    options: ServerOptions,
    listener: Listener,
    slot: int,
    mask: Iterable[int],
    loop: str,
    lifeline: tuple[int, int] | None = None,
    notifier: Notifier | None = None,
    metrics: bool = False,
) -> NoReturn:  # pragma: no cover - runs in the forked worker
    status = 1
    try:
        if lifeline is not None:
            os.close(lifeline[1])  # only the parent may hold the write end
        for signum in _SIGNALS:
            signal.signal(signum, signal.SIG_DFL)
        # SIGHUP stays blocked until serve() handles it: one forwarded while this worker
        # starts would kill it otherwise (SIGHUP's default), and its reload must not be lost.
        signal.pthread_sigmask(signal.SIG_SETMASK, {*mask, signal.SIGHUP})
        structlog.contextvars.bind_contextvars(worker=slot, pid=os.getpid())
        worker_options = {
            **dict(options),
            "listen_socket": listener.sock,
            "socket_activation": False,
        }
        if metrics:  # made here: its values go to this worker's own files
            worker_options["metrics"] = Metrics()
        watched = lifeline[0] if lifeline is not None else None
        serving = _serve_while_parent_lives(app, worker_options, watched, notifier or Notifier())
        run_in_loop(serving, loop)
        status = 0
    except MilterError as exc:
        print(f"milterapp: error: worker {slot}: {exc}", file=sys.stderr)
    except BaseException:  # noqa: BLE001 - log anything, then os._exit() below
        structlog.get_logger("milterapp").exception("worker_crashed", app=app.name)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


async def _serve_while_parent_lives(
    app: Servable, options: dict[str, Any], lifeline: int | None, notifier: Notifier
) -> None:  # pragma: no cover - runs in the forked worker
    """Serve; stop gracefully, as on SIGTERM, if the parent dies (end of file on the lifeline)."""
    loop = asyncio.get_running_loop()

    def parent_gone() -> None:
        assert lifeline is not None
        loop.remove_reader(lifeline)
        structlog.get_logger("milterapp").warning("parent_gone", app=app.name)
        stop()

    def stop() -> None:
        if not app.serving.running:  # not serving yet: ask again in a moment
            loop.call_later(0.05, stop)
        else:
            app.serving.stop()

    if lifeline is not None:
        loop.add_reader(lifeline, parent_gone)
    try:
        await serve(app, handle_signals=True, notifier=notifier, **options)
    finally:
        if lifeline is not None:
            loop.remove_reader(lifeline)


class _ParentNotifier(Notifier):  # pragma: no cover - runs in the forked worker
    """A worker's notifier: it reports being ready to its parent, which alone tells systemd."""

    def __init__(self, parent: int) -> None:
        super().__init__()
        self.parent = parent

    def ready(self, status: str | None = None, *, main_pid: int | None = None) -> None:
        if os.getppid() == self.parent:  # never a signal to whoever adopted us (init)
            _signal(self.parent, _WORKER_READY)


def _signal(pid: int, signum: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):  # exited already; waitpid() collects it
        os.kill(pid, signum)


def _describe(status: int) -> str:
    code = os.waitstatus_to_exitcode(status)
    return f"signal {signal.Signals(-code).name}" if code < 0 else f"exit {code}"
