"""systemd's notify protocol: what the server sends to $NOTIFY_SOCKET, and when.

A unix datagram socket bound in a temporary directory plays systemd; every test waits for
the datagrams themselves (bounded by the test timeout), never for time to pass.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from milterapp.app import App
from milterapp.server import MilterServer, serve
from milterapp.server.notify import Notifier
from tests.server.support import assert_serves, run, stamping_app, until
from tests.server.test_workers import SCRIPT as WORKERS_SCRIPT
from tests.server.test_workers import parent


class Systemd:
    """The service manager's end: a datagram socket that collects what the milter sends."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(b"\0" + address[1:].encode() if address.startswith("@") else address)
        self.sock.setblocking(False)

    async def message(self) -> dict[str, str]:
        """The next datagram, as its ``KEY=VALUE`` lines."""
        data = await asyncio.get_running_loop().sock_recv(self.sock, 4096)
        return dict(line.split("=", 1) for line in data.decode().split("\n"))

    async def until(self, key: str) -> dict[str, str]:
        """The next datagram that carries ``key`` (watchdog pings may come in between)."""
        while key not in (message := await self.message()):
            pass
        return message

    def pending(self) -> bytes | None:
        """A datagram already waiting, or None."""
        try:
            return self.sock.recv(4096)
        except BlockingIOError:
            return None


@pytest.fixture
def systemd(sock_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Systemd]:
    manager = Systemd(str(sock_dir / "notify"))
    monkeypatch.setenv("NOTIFY_SOCKET", manager.address)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    yield manager
    manager.sock.close()


def test_notify_without_notify_socket_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    notifier = Notifier.from_environment()
    assert not notifier.enabled
    assert notifier.watchdog_interval is None
    with capture_logs() as logs:
        notifier.ready("serving")
        notifier.reloading()
        notifier.stopping()
        notifier.watchdog()
    assert notifier._sock is None  # not even a socket was made
    assert logs == []


def test_notify_sends_each_message_as_one_datagram(systemd: Systemd) -> None:
    notifier = Notifier.from_environment()

    async def body() -> None:
        notifier.ready("serving inet:10025@127.0.0.1", main_pid=1234)
        assert await systemd.message() == {
            "READY": "1",
            "MAINPID": "1234",
            "STATUS": "serving inet:10025@127.0.0.1",
        }
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        notifier.reloading()
        reloading = await systemd.message()
        after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        assert reloading["RELOADING"] == "1"
        assert before <= int(reloading["MONOTONIC_USEC"]) <= after
        notifier.stopping()
        assert (await systemd.message())["STOPPING"] == "1"
        notifier.watchdog()
        assert await systemd.message() == {"WATCHDOG": "1"}

    try:
        run(body())
    finally:
        notifier.close()


def test_notify_reaches_an_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    systemd = Systemd(f"@milterapp-test-{uuid.uuid4().hex}")
    monkeypatch.setenv("NOTIFY_SOCKET", systemd.address)
    notifier = Notifier.from_environment()

    async def body() -> None:
        notifier.ready()
        assert await systemd.message() == {"READY": "1"}

    try:
        run(body())
    finally:
        notifier.close()
        systemd.sock.close()


@pytest.mark.parametrize("address", ["/nonexistent/notify", "vsock:2:1234"])
def test_notify_failure_is_logged_once_and_never_raised(address: str) -> None:
    notifier = Notifier(address)
    with capture_logs() as logs:
        notifier.ready()
        notifier.watchdog()
        notifier.stopping()
    notifier.close()
    assert [log["event"] for log in logs] == ["notify_failed"]
    assert logs[0]["log_level"] == "warning"
    assert logs[0]["socket"] == address


@pytest.mark.parametrize(
    ("environ", "interval"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),  # for another process
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
)
def test_notify_watchdog_interval_is_half_of_watchdog_usec(
    environ: dict[str, str], interval: float | None
) -> None:
    notifier = Notifier.from_environment({"NOTIFY_SOCKET": "/run/systemd/notify", **environ})
    assert notifier.watchdog_interval == interval
    without_socket = Notifier.from_environment(environ)
    assert without_socket.watchdog_interval is None


def test_notify_server_is_ready_once_accepting_and_stopping_when_draining(
    systemd: Systemd, sock_dir: Path
) -> None:
    app = stamping_app()
    path = sock_dir / "milter.sock"

    async def body() -> None:
        server = MilterServer(app, spec=f"unix:{path}", notifier=Notifier.from_environment())
        assert systemd.pending() is None
        await server.start()
        ready = await systemd.message()
        assert ready == {"READY": "1", "STATUS": f"serving unix:{path}"}
        await assert_serves(server)  # READY came once connections are accepted
        app.shutdown()
        await server.wait_stopped()
        await server.close()
        assert await systemd.message() == {"STOPPING": "1", "STATUS": "stopping"}
        assert systemd.pending() is None

    run(body())


def test_notify_server_reload_is_reloading_then_ready(systemd: Systemd, sock_dir: Path) -> None:
    app = App("reloading")
    reloaded = asyncio.Event()

    @app.on_reload
    def reload_lists() -> None:
        reloaded.set()

    async def body() -> None:
        serving = asyncio.create_task(
            serve(app, f"unix:{sock_dir / 'm.sock'}", handle_signals=True)
        )
        assert "READY" in await systemd.message()
        app.reload()
        reloading = await systemd.message()
        assert reloading["RELOADING"] == "1"
        assert "MONOTONIC_USEC" in reloading
        assert (await systemd.message())["READY"] == "1"
        assert reloaded.is_set()  # the hooks ran between RELOADING=1 and READY=1
        app.shutdown()
        await serving
        assert (await systemd.message())["STOPPING"] == "1"

    run(body())


def test_notify_server_pings_the_watchdog_from_its_loop(
    systemd: Systemd, sock_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "20000")  # WatchdogSec=20ms: a ping every 10 ms
    app = stamping_app()

    async def body() -> None:
        serving = asyncio.create_task(
            serve(app, f"unix:{sock_dir / 'm.sock'}", handle_signals=True)
        )
        for _ in range(3):
            assert await systemd.until("WATCHDOG") == {"WATCHDOG": "1"}
        app.shutdown()
        await serving
        await systemd.until("STOPPING")

    run(body())


def test_notify_embedded_server_tells_systemd_nothing(systemd: Systemd, sock_dir: Path) -> None:
    app = stamping_app()
    path = sock_dir / "milter.sock"

    async def body() -> None:
        serving = asyncio.create_task(serve(app, f"unix:{path}"))  # handle_signals=False
        await until(lambda: app.serving.running)
        app.shutdown()  # start() still completes, where a READY=1 would be sent
        await serving

    run(body())
    assert systemd.pending() is None


@pytest.mark.skipif(sys.platform != "linux", reason="workers use fork() (Linux)")
def test_notify_with_workers_the_parent_speaks_once_every_worker_serves(
    systemd: Systemd, sock_dir: Path, tmp_path: Path
) -> None:
    script = tmp_path / "workers_app.py"
    script.write_text(WORKERS_SCRIPT)
    path = sock_dir / "milter.sock"

    async def body() -> None:
        async with parent(str(script), f"unix:{path}", "2") as child:
            ready = await systemd.message()
            # Each worker reports after it logs that it listens: both lines are written.
            assert len(set(await child.listening(2))) == 2
            assert ready == {
                "READY": "1",
                "MAINPID": str(child.process.pid),
                "STATUS": f"serving unix:{path} with 2 workers",
            }
            child.process.send_signal(signal.SIGHUP)
            assert (await systemd.message())["RELOADING"] == "1"
            assert (await systemd.message())["READY"] == "1"
            for _ in range(2):  # logged by each worker before it reported to the parent
                await child.line(lambda text: "event=reload " in text)
            assert systemd.pending() is None
            await child.stop()
            assert (await systemd.message())["STOPPING"] == "1"

    run(body(), 60)
