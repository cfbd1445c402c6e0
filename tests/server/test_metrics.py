"""Prometheus metrics and /healthz (``--metrics``): what the server counts, scraped over HTTP
and read with prometheus_client's own text parser."""

from __future__ import annotations

import asyncio
import sys
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Final

import pytest
from prometheus_client.parser import text_string_to_metric_families

from milterapp import App, Body, Context, EndOfMessage, EnvFrom, EnvRcpt, Reject, TempFail
from milterapp.errors import SetupError
from milterapp.server import metrics as metrics_module
from milterapp.server.metrics import FLUSH_INTERVAL, HANDLER_BUCKETS, Metrics, MetricsEndpoint
from milterapp.testing import MtaClient
from tests.server.support import (
    connect,
    run,
    running_server,
    send_message,
    start_session,
)
from tests.server.test_workers import free_port, parent


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample at ``/metrics``, by name and labels."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


ACCEPTED: Final = ("milterapp_messages_total", (("stage", "eom"), ("verdict", "accept")))


def scrape_until(port: int, key: Any, value: float, within: float = 10.0) -> dict[Any, float]:
    """Scrape until the sample ``key`` reaches ``value`` (workers hand counts over every
    second); fail after ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        samples = scrape(port)
        if samples.get(key) == value:
            return samples
        assert time.monotonic() < deadline, f"{key} is {samples.get(key)}, not {value}"
        time.sleep(FLUSH_INTERVAL / 10)  # polls another process's timer, bounded above


def health(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as exc:
        exc.close()
        return int(exc.code)


def sorter() -> App:
    app = App("sorter")

    @app.on("envfrom")
    def sender(event: EnvFrom) -> Reject | None:
        return Reject() if event.address == "spam@example.com" else None

    @app.on("envrcpt")
    def recipient(event: EnvRcpt) -> TempFail | None:
        return TempFail() if event.address.startswith("full@") else None

    @app.on("body")
    def look(event: Body) -> None:
        return None

    @app.on("eom")
    def stamp(event: EndOfMessage, ctx: Context) -> Any:
        if ctx.message.sender.address == "bug@example.org":
            raise RuntimeError("a bug")
        if ctx.message.sender.address == "odd@example.org":
            return "not a reply"
        return None

    return app


def test_a_scrape_counts_connections_messages_and_failures() -> None:
    async def body() -> tuple[dict[Any, float], int, int]:
        metrics = Metrics()
        endpoint = MetricsEndpoint("127.0.0.1:0", metrics.registry, lambda: metrics.accepting)
        try:
            async with running_server(sorter(), metrics=metrics) as server:
                client = await connect(server)
                await start_session(client)
                await send_message(client, recipients=["bob@example.net", "full@example.net"])
                await send_message(client, sender="spam@example.com")
                await send_message(client, sender="bug@example.org")
                await send_message(client, sender="odd@example.org")
                await client.close()
                up = await asyncio.to_thread(health, endpoint.port)
            down = await asyncio.to_thread(health, endpoint.port)
            samples = await asyncio.to_thread(scrape, endpoint.port)
        finally:
            endpoint.close()
        return samples, up, down

    samples, up, down = run(body())
    assert (up, down) == (200, 503)
    assert samples["milterapp_connections_total", ()] == 1
    assert samples["milterapp_connections_open", ()] == 0

    def messages(verdict: str, stage: str) -> float:
        return samples["milterapp_messages_total", (("stage", stage), ("verdict", verdict))]

    assert messages("accept", "eom") == 1
    assert messages("reject", "envfrom") == 1
    assert messages("tempfail", "eom") == 2  # the bug and the odd reply: the fallback
    assert samples["milterapp_recipients_refused_total", ()] == 1
    assert samples["milterapp_handler_failures_total", (("kind", "raised"),)] == 1
    assert samples["milterapp_handler_failures_total", (("kind", "bad_reply"),)] == 1
    eom_count = samples["milterapp_handler_duration_seconds_count", (("stage", "eom"),)]
    assert eom_count == 3  # the spam never reached end of message
    assert samples["milterapp_body_bytes_total", ()] == 3 * len(b"Hello, Bob.\r\n")


def test_a_scrape_shows_the_process_and_the_apps_own_metrics() -> None:
    """What an app registers in prometheus_client's default registry is served beside
    milterapp's metrics, with the process's memory and CPU."""
    from prometheus_client import REGISTRY, Counter

    own = Counter("test_cache_hits", "an app's own metric")
    try:
        own.inc(3)
        metrics = Metrics()
        endpoint = MetricsEndpoint("127.0.0.1:0", metrics.registry, lambda: True)
        try:
            samples = scrape(endpoint.port)
        finally:
            endpoint.close()
    finally:
        REGISTRY.unregister(own)
    assert samples["test_cache_hits_total", ()] == 3
    assert samples["milterapp_connections_total", ()] == 0
    if sys.platform == "linux":
        assert samples["process_resident_memory_bytes", ()] > 0


def test_an_unknown_path_is_404_and_a_busy_port_a_setup_error() -> None:
    metrics = Metrics()
    endpoint = MetricsEndpoint("127.0.0.1:0", metrics.registry, lambda: True)
    try:
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(f"http://127.0.0.1:{endpoint.port}/", timeout=10)
        caught.value.close()
        assert caught.value.code == 404
        with pytest.raises(SetupError, match=f"--metrics 127.0.0.1:{endpoint.port}"):
            MetricsEndpoint(f"127.0.0.1:{endpoint.port}", metrics.registry, lambda: True)
    finally:
        endpoint.close()


def test_metrics_without_the_extra_say_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SetupError, match=r"pip install 'milterapp\[metrics\]'"):
        Metrics()


SCRIPT = textwrap.dedent(
    """
    import sys

    import prometheus_client  # (before run(), as an app with metrics of its own does)

    from milterapp import App

    app = App("counted")
    counted = []

    @app.on_startup
    def make_the_apps_own_metric():
        counted.append(prometheus_client.Counter("app_stamps", "the app's own count"))

    @app.on("eom")
    def stamp(event, ctx):
        ctx.add_header("X-Counted", "yes")
        counted[0].inc()

    if __name__ == "__main__":
        app.run(sys.argv[1], workers=2, metrics=sys.argv[2], argv=[])
    """
)


@pytest.mark.skipif(sys.platform != "linux", reason="workers use fork() (Linux)")
def test_with_two_workers_a_scrape_shows_the_sum(tmp_path: Path) -> None:
    """The parent serves the sum of both workers' metrics, the app's own included, although
    the app imported prometheus_client before run() set its multiprocess mode up."""
    script = tmp_path / "counted.py"
    script.write_text(SCRIPT)
    port, metrics_port = free_port(), free_port()

    async def body() -> dict[Any, float]:
        async with parent(
            str(script), f"inet:{port}@127.0.0.1", f"127.0.0.1:{metrics_port}"
        ) as child:
            await child.listening(2)
            clients = []
            for _ in range(6):  # spread over both workers by the kernel
                client = await MtaClient.connect(("127.0.0.1", port), timeout=10)
                await start_session(client)
                await send_message(client)
                clients.append(client)
            for client in clients:
                await client.close()
            # Workers hand their counts over every second (FLUSH_INTERVAL): scrape until then.
            samples = await asyncio.to_thread(scrape_until, metrics_port, ACCEPTED, 6)
            await child.stop()
        return samples

    samples = run(body(), timeout=60)
    assert samples[ACCEPTED] == 6
    assert samples["milterapp_connections_total", ()] == 6
    assert samples["app_stamps_total", ()] == 6


def test_the_counts_handed_over_in_bulk_are_what_observe_would_give() -> None:
    """prometheus_client has no public bulk observe(): the hand-over writes its values,
    which this test holds to observe()'s result (a new prometheus_client could differ)."""
    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    seconds = [0.00001, 0.0001, 0.0003, 0.002, 0.002, 0.7, 12.0, 0.0001]
    metrics = Metrics()
    for value in seconds:
        metrics.durations[EndOfMessage].append(value)
    metrics.flush()
    metrics.durations[EndOfMessage].append(0.03)  # a second hand-over adds to the first
    metrics.flush()
    expected = CollectorRegistry()
    histogram = Histogram(
        "milterapp_handler_duration_seconds",
        "time from a command's arrival to its reply, by stage",
        ["stage"],
        buckets=HANDLER_BUCKETS,
        registry=expected,
    )
    for value in [*seconds, 0.03]:
        histogram.labels("eom").observe(value)

    def lines(registry: Any) -> list[str]:
        text = generate_latest(registry).decode()
        return [
            line
            for line in text.splitlines()
            if line.startswith("milterapp_handler_duration_seconds_") and "_created" not in line
        ]

    assert lines(metrics.registry) == lines(expected)


def test_a_scrape_of_a_running_server_shows_what_happened_until_now() -> None:
    async def body() -> dict[Any, float]:
        metrics = Metrics()
        endpoint = MetricsEndpoint(
            "127.0.0.1:0",
            metrics.registry,
            lambda: metrics.accepting,
            before_scrape=metrics.flush_from_any_thread,
        )
        try:
            async with running_server(sorter(), metrics=metrics) as server:
                client = await connect(server)
                await start_session(client)
                await send_message(client)
                samples = await asyncio.to_thread(scrape, endpoint.port)  # not a second later
                await client.close()
        finally:
            endpoint.close()
        return samples

    samples = run(body())
    assert samples["milterapp_messages_total", (("stage", "eom"), ("verdict", "accept"))] == 1
    assert samples["milterapp_connections_open", ()] == 1
