"""Prometheus metrics and the health endpoint: ``--metrics HOST:PORT``.

:class:`Metrics` holds the counters and histograms of one server process, made with the
``prometheus_client`` package (``pip install 'milterapp[metrics]'``); the server, its
connections and responders call its methods where things happen. :class:`MetricsEndpoint`
serves them over HTTP, in a thread of the standard library's ``http.server``: ``/metrics`` in
Prometheus' text format, and ``/healthz``, 200 while the server accepts connections and 503
while it drains.

With worker processes (``--workers N``) each worker writes its values to files in a
directory the parent made, before any worker started, and named in
``PROMETHEUS_MULTIPROC_DIR`` (prometheus_client's multiprocess mode); the parent serves the
sum over all workers. docs/operations.md lists every metric.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import importlib.util
import math
import os
import sys
import threading
from collections.abc import Callable
from typing import Any, Final

from milterapp.errors import SetupError
from milterapp.events import Event
from milterapp.server.outcomes import stage_name

__all__ = [
    "HANDLER_BUCKETS",
    "Metrics",
    "MetricsEndpoint",
    "multiprocess_directory",
    "require_prometheus",
    "worker_gone",
]

#: Seconds: a plain handler takes tens of microseconds, a DNS or Redis lookup milliseconds,
#: and the MTA gives up after its own timeout (Postfix: 10 s per command by default).
HANDLER_BUCKETS: Final = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
_MULTIPROCESS: Final = "PROMETHEUS_MULTIPROC_DIR"
#: Seconds between two hand-overs of the counts to prometheus_client (Prometheus scrapes
#: every 15 s or so: a second late is nothing to it).
FLUSH_INTERVAL: Final = 1.0


def require_prometheus() -> None:
    """Raise :class:`SetupError` unless ``prometheus_client`` is installed (without importing
    it: with workers it must first be imported after the multiprocess directory is set)."""
    if importlib.util.find_spec("prometheus_client") is None:
        raise SetupError(
            "--metrics needs the prometheus_client package: pip install 'milterapp[metrics]'"
        )


class Metrics:
    """The metrics of one server process (one worker), in ``registry``: by default a fresh
    one that also shows prometheus_client's default registry (the process's own metrics, and
    the app's). With multiprocess mode the values go to files whatever the registry."""

    def __init__(self, registry: Any = None) -> None:
        require_prometheus()
        from prometheus_client import (
            REGISTRY,
            CollectorRegistry,
            Counter,
            Gauge,
            Histogram,
        )

        if registry is None:
            # Beside milterapp's own, what prometheus_client's default registry holds: the
            # process (memory, CPU, open files) and any metrics of the app's own.
            registry = CollectorRegistry()
            registry.register(REGISTRY)
        self.registry = registry
        on = self.registry
        self.connections = Counter(
            "milterapp_connections", "MTA connections accepted and served", registry=on
        )
        self.connections_open = Gauge(
            "milterapp_connections_open",
            "MTA connections open now",
            multiprocess_mode="livesum",
            registry=on,
        )
        self.messages = Counter(
            "milterapp_messages",
            "messages ended, by verdict and the stage that decided it",
            ["verdict", "stage"],
            registry=on,
        )
        self.recipients_refused = Counter(
            "milterapp_recipients_refused",
            "recipients refused (handler, limit or MTA)",
            registry=on,
        )
        self.handler_seconds = Histogram(
            "milterapp_handler_duration_seconds",
            "time from a command's arrival to its reply, by stage",
            ["stage"],
            buckets=HANDLER_BUCKETS,
            registry=on,
        )
        self.handler_failures = Counter(
            "milterapp_handler_failures",
            "handler failures, by kind: raised, timed_out, bad_reply",
            ["kind"],
            registry=on,
        )
        self.upstream_failures = Counter(
            "milterapp_upstream_failures",
            "upstream milter failures, by upstream and kind: unreachable, negotiation, "
            "timeout, protocol, closed",
            ["upstream", "kind"],
            registry=on,
        )
        self.protocol_errors = Counter(
            "milterapp_protocol_errors", "connections closed for a protocol error", registry=on
        )
        self.limits = Counter(
            "milterapp_limits_exceeded", "limits hit, by limit", ["limit"], registry=on
        )
        self.timeouts = Counter(
            "milterapp_timeouts",
            "connections closed by a deadline, by kind: idle, read, write",
            ["kind"],
            registry=on,
        )
        self.body_bytes = Counter(
            "milterapp_body_bytes", "message body bytes received from the MTA", registry=on
        )
        self.progress = Counter(
            "milterapp_progress_packets", "progress packets sent while handlers ran", registry=on
        )
        # What happens per command and per message is counted here in plain Python and
        # handed to prometheus_client in bulk by flush(): its observe() and inc() take a lock
        # and a microsecond or more each, which per command cost the server a fifth of its
        # speed. Buckets as prometheus_client keeps them: not cumulative, +Inf last.
        self._bounds = (*HANDLER_BUCKETS, math.inf)
        #: Each command's time since the last flush, by event model: connections append
        #: here (a list append is the least a command can pay), flush() sorts them into
        #: buckets.
        self.durations: collections.defaultdict[type[Event], list[float]] = collections.defaultdict(
            list
        )
        self._verdicts: dict[tuple[str, str], int] = {}
        self._opened = 0
        self._open = 0
        self._refused = 0
        self._body_bytes = 0
        self._flushing: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        #: Whether the server accepts connections (``/healthz`` says 200), and drains.
        self.accepting = False

    # --- per command, per message, per connection: counted here ------------------------

    def connection_opened(self) -> None:
        self._opened += 1
        self._open += 1

    def connection_closed(self) -> None:
        self._open -= 1

    def message_done(self, verdict: str, stage: str, refused: int, body_bytes: int) -> None:
        """One message ended: its verdict, where, its refused recipients and body size."""
        key = (verdict, stage)
        self._verdicts[key] = self._verdicts.get(key, 0) + 1
        self._refused += refused
        self._body_bytes += body_bytes

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Hand the counts to prometheus_client every second, from ``loop``'s thread."""
        self._loop = loop
        self._flushing = loop.call_later(FLUSH_INTERVAL, self._tick)

    def stop(self) -> None:
        """The server stops: hand over what is left, and stop the timer."""
        if self._flushing is not None:
            self._flushing.cancel()
            self._flushing = None
        self.flush()

    def _tick(self) -> None:
        self.flush()
        if self._loop is not None and self._flushing is not None:
            self._flushing = self._loop.call_later(FLUSH_INTERVAL, self._tick)

    def flush_from_any_thread(self, timeout: float = 1.0) -> None:
        """Flush in the server's thread and wait for it (a scrape of this process's own
        metrics then shows everything up to now)."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        done = threading.Event()

        def flush() -> None:
            self.flush()
            done.set()

        try:
            loop.call_soon_threadsafe(flush)
        except RuntimeError:  # the loop closed meanwhile
            return
        done.wait(timeout)

    def flush(self) -> None:
        """Hand the counts made since the last flush to prometheus_client (the loop's
        thread only: the counts are not locked)."""
        if self._opened:
            self.connections.inc(self._opened)
            self._opened = 0
        self.connections_open.set(self._open)
        verdicts, self._verdicts = self._verdicts, {}
        for (verdict, stage), count in verdicts.items():
            self.messages.labels(verdict, stage).inc(count)
        if self._refused:
            self.recipients_refused.inc(self._refused)
            self._refused = 0
        if self._body_bytes:
            self.body_bytes.inc(self._body_bytes)
            self._body_bytes = 0
        bounds = self._bounds
        for event, seconds in self.durations.items():
            if not seconds:
                continue
            child = self.handler_seconds.labels(stage_name(event))
            # Sorted, the values fall into the buckets in runs: one search per bound finds
            # each run's end (each value in turn would cost a search and a count in Python).
            seconds.sort()
            ends = [bisect.bisect_right(seconds, bound) for bound in bounds]
            counts = [end - start for start, end in zip([0, *ends], ends, strict=False)]
            # As observe() would have, once per observation: its own values, in bulk
            # (prometheus_client has no public way; tests/server/test_metrics.py checks
            # that the result is observe()'s).
            for at, count in enumerate(counts):
                if count:
                    child._buckets[at].inc(count)
            child._sum.inc(sum(seconds))
            seconds.clear()

    # --- rare: handed over at once --------------------------------------------------------

    def handler_failed(self, kind: str) -> None:
        self.handler_failures.labels(kind).inc()

    def upstream_failed(self, name: str, kind: str) -> None:
        self.upstream_failures.labels(name, kind).inc()

    def protocol_error(self) -> None:
        self.protocol_errors.inc()

    def limit_exceeded(self, limit: str) -> None:
        self.limits.labels(limit).inc()

    def timeout(self, kind: str) -> None:
        self.timeouts.labels(kind).inc()

    def progress_sent(self) -> None:
        self.progress.inc()


class MetricsEndpoint:
    """``/metrics`` and ``/healthz`` over HTTP at ``address`` (``HOST:PORT``; port 0 picks
    one, see :attr:`port`), until :meth:`close`.

    Args:
        address: where to listen.
        registry: what ``/metrics`` shows; None: the sum of the workers' files (multiprocess
            mode, ``PROMETHEUS_MULTIPROC_DIR``).
        healthy: whether ``/healthz`` answers 200 (else 503).
        before_scrape: called before each ``/metrics`` answer (a process's own metrics
            flush their counts: :meth:`Metrics.flush_from_any_thread`).
    """

    def __init__(
        self,
        address: str,
        registry: Any,
        healthy: Callable[[], bool],
        before_scrape: Callable[[], None] | None = None,
    ) -> None:
        require_prometheus()
        import http.server  # only with --metrics: a plain server does without it

        from prometheus_client import (
            CONTENT_TYPE_LATEST,
            CollectorRegistry,
            generate_latest,
        )
        from prometheus_client.multiprocess import (
            MultiProcessCollector,
        )

        host, _, port = address.rpartition(":")
        if not port.isdigit():
            raise SetupError(f"--metrics: expected HOST:PORT, not {address!r}")
        if registry is None:
            registry = CollectorRegistry()
            MultiProcessCollector(registry)  # type: ignore[no-untyped-call]

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.split("?", 1)[0] == "/metrics":
                    if before_scrape is not None:
                        before_scrape()
                    self._answer(200, CONTENT_TYPE_LATEST, generate_latest(registry))
                elif self.path == "/healthz":
                    ok = healthy()
                    self._answer(200 if ok else 503, "text/plain", b"ok\n" if ok else b"draining\n")
                else:
                    self._answer(404, "text/plain", b"not found: try /metrics or /healthz\n")

            def _answer(self, status: int, kind: str, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # scrapes every 15 s would flood the milter's own log

        try:
            self.http = http.server.ThreadingHTTPServer(
                # No host: the loopback; all interfaces only when asked (0.0.0.0).
                (host.strip("[]") or "127.0.0.1", int(port)),
                Handler,
            )
        except OSError as exc:
            raise SetupError(f"--metrics {address}: {exc.strerror or exc}") from None
        self.http.daemon_threads = True
        self.port: int = self.http.server_address[1]
        self._thread = threading.Thread(
            target=self.http.serve_forever, name="milterapp-metrics", daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        self.http.shutdown()
        self.http.server_close()
        self._thread.join(timeout=5)


def multiprocess_directory(directory: str) -> None:
    """Make the workers' metrics go to files in ``directory`` (multiprocess mode): call in the
    parent before any worker is forked and any of milterapp's metrics is made."""
    os.environ[_MULTIPROCESS] = directory
    if "prometheus_client.values" in sys.modules:
        # prometheus_client chooses where values live when it is imported, and an app may
        # have imported it already (for metrics of its own): choose again, as the import
        # would have now. Metrics made before this keep their in-process values.
        from prometheus_client import values

        values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]


def worker_gone(pid: int) -> None:
    """A worker exited: drop its live gauges from the sum (its counters stay counted)."""
    if os.environ.get(_MULTIPROCESS):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]
