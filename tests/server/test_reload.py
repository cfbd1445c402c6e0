"""Reload hooks: ``@app.on_reload`` run on SIGHUP or ``app.reload()``, while connections go on.

The first tests drive a server in this process with ``app.reload()``; the others send a real
SIGHUP to ``app.run()`` in a child process, with one process or two workers. Nothing sleeps:
the tests wait on events set by hooks, on the milter's answers, on log lines and on FIFOs.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
import textwrap
import threading
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from milterapp.app import App
from milterapp.errors import SetupError
from milterapp.replies import AddHeader, Continue
from milterapp.testing import MtaClient
from tests.server.support import (
    assert_serves,
    connect,
    run,
    running_server,
    send_message,
    stamping_app,
    start_session,
    until,
)
from tests.server.test_workers import parent

# --- in this process: app.reload() -----------------------------------------------------------


def test_reload_runs_the_hooks_in_order_and_a_failing_one_does_not_stop_the_others() -> None:
    app = stamping_app()
    ran: list[str] = []
    done = asyncio.Event()

    @app.on_reload
    def load_block_list() -> None:
        ran.append("block list")
        raise OSError("block list unreadable")

    @app.on_reload
    async def load_keys() -> None:
        ran.append("keys")
        done.set()

    async def body() -> None:
        with capture_logs() as logs:
            async with running_server(app) as server:
                app.reload()
                await done.wait()
                await assert_serves(server)
                app.reload()  # the next reload runs every hook again
                await until_logged(logs, "reload", 2)
        assert ran == ["block list", "keys", "block list", "keys"]
        [failed, *_] = [log for log in logs if log["event"] == "reload_failed"]
        assert failed["log_level"] == "error"
        assert str(failed["hook"]).endswith("load_block_list")
        assert isinstance(failed["exc_info"], OSError)
        reloads = [log for log in logs if log["event"] == "reload"]
        assert [(log["hooks"], log["failed"], log["log_level"]) for log in reloads] == [
            (2, 1, "info"),
            (2, 1, "info"),
        ]

    run(body())


async def until_logged(logs: list[dict[str, object]], event: str, count: int = 1) -> None:
    """Let the loop run until ``event`` has been logged ``count`` times."""
    # Not a timed sleep: sleep(0) lets the reload task, already scheduled, take its steps.
    while sum(log["event"] == event for log in logs) < count:  # noqa: ASYNC110
        await asyncio.sleep(0)


def test_reload_serves_connections_while_an_async_hook_awaits() -> None:
    app = stamping_app()
    entered, release = asyncio.Event(), asyncio.Event()
    reloaded: list[int] = []

    @app.on_reload
    async def fetch_settings() -> None:
        entered.set()
        await release.wait()
        reloaded.append(1)

    async def body() -> None:
        async with running_server(app) as server, await connect(server) as before:
            await start_session(before)
            app.reload()
            await entered.wait()
            answer = await send_message(before)  # opened before the reload, served during it
            assert answer.modifications == [AddHeader(name="X-Stamp", value="listening")]
            await assert_serves(server)  # and new connections are accepted
            assert reloaded == []
            release.set()
            await until(lambda: server._reloading is None)
            assert reloaded == [1]
            assert (await send_message(before)).verdict == Continue()

    run(body())


def test_reload_asked_again_while_running_runs_once_more_afterwards() -> None:
    app = App("coalesced")
    entered, release = asyncio.Event(), asyncio.Event()
    rounds: list[int] = []

    @app.on_reload
    async def reload_lists() -> None:
        rounds.append(len(rounds) + 1)
        entered.set()
        await release.wait()

    async def body() -> None:
        async with running_server(app) as server:
            app.reload()
            await entered.wait()
            for _ in range(3):  # three SIGHUPs during the first round: one more round
                app.reload()
            assert rounds == [1]  # never two rounds at once
            release.set()
            await until(lambda: server._reloading is None)
        assert rounds == [1, 2]

    run(body())


def test_reload_from_another_thread() -> None:
    app = App("threaded")
    reloaded = asyncio.Event()

    @app.on_reload
    def reload_keys() -> None:
        reloaded.set()

    async def body() -> None:
        async with running_server(app):
            thread = threading.Thread(target=app.reload)
            thread.start()
            await reloaded.wait()
            thread.join()

    run(body())


def test_reload_under_way_at_shutdown_finishes_before_the_shutdown_hooks() -> None:
    app = App("reload-then-stop")
    entered, release = asyncio.Event(), asyncio.Event()
    order: list[str] = []

    @app.on_reload
    async def reload_lists() -> None:
        entered.set()
        await release.wait()
        order.append("reloaded")

    @app.on_shutdown
    def close_pools() -> None:
        order.append("shutdown")

    async def body() -> None:
        async with running_server(app) as server:
            app.reload()
            await entered.wait()
            app.shutdown()
            await server.wait_stopped()
            closing = asyncio.create_task(server.close())
            await until(lambda: server._stopping)
            app.reload()  # stopping: not run again
            assert order == []
            release.set()
            await closing
        assert order == ["reloaded", "shutdown"]

    run(body())


def test_reload_still_running_when_the_grace_expires_is_cancelled() -> None:
    app = App("stuck-reload")
    entered = asyncio.Event()
    cancelled: list[bool] = []

    @app.on_reload
    async def stuck() -> None:
        entered.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    async def body() -> None:
        async with running_server(app, shutdown_grace=0.05) as server:
            app.reload()
            await entered.wait()
        assert server._reloading is None

    run(body())
    assert cancelled == [True]


def test_reload_when_not_serving_does_nothing_and_hooks_register_before_serving() -> None:
    app = App("idle")
    ran: list[int] = []
    app.on_reload(lambda: ran.append(1))
    app.reload()  # no server: nothing happens
    assert ran == []
    asyncio.run(app.run_startup())
    with pytest.raises(SetupError, match="cannot add a reload hook"):
        app.on_reload(lambda: None)


# --- a real SIGHUP to app.run() in a child process ---------------------------------------------

SCRIPT = textwrap.dedent(
    """
    import asyncio
    import os
    import sys
    from pathlib import Path

    import structlog

    from milterapp.app import App

    app = App("reloading")
    counter = Path(sys.argv[3])
    gate = Path(sys.argv[4]) if len(sys.argv) > 4 else None  # a FIFO that holds the hooks

    @app.on("eom")
    def stamp(event, ctx):
        ctx.add_header("X-Pid", str(os.getpid()))

    @app.on_startup
    async def started():
        if gate is not None and sys.argv[5:] == ["startup"]:
            structlog.get_logger().info("in_startup")
            await asyncio.to_thread(gate.read_text)

    @app.on_reload
    def broken():
        raise RuntimeError("bad block list")

    @app.on_reload
    async def count():
        if gate is not None and sys.argv[5:] != ["startup"]:
            await asyncio.to_thread(gate.read_text)
        with counter.open("a") as lines:
            lines.write(f"{os.getpid()}\\n")

    if __name__ == "__main__":
        app.run(sys.argv[1], workers=int(sys.argv[2]), argv=[])
    """
)

PID = re.compile(r"\bpid=(\d+)")
linux = pytest.mark.skipif(sys.platform != "linux", reason="workers use fork() (Linux)")


@pytest.fixture
def script(tmp_path: Path) -> Path:
    path = tmp_path / "reloading_app.py"
    path.write_text(SCRIPT)
    return path


def test_sighup_runs_the_hooks_while_an_open_connection_goes_on(
    script: Path, sock_dir: Path, tmp_path: Path
) -> None:
    path, counter, gate = sock_dir / "milter.sock", tmp_path / "counter", sock_dir / "gate"
    os.mkfifo(gate)

    async def body() -> None:
        async with parent(str(script), f"unix:{path}", "1", str(counter), str(gate)) as child:
            await child.line(lambda text: "event=listening" in text)
            async with await MtaClient.connect(f"unix:{path}", timeout=10) as client:
                await start_session(client)
                child.process.send_signal(signal.SIGHUP)
                failed = await child.line(lambda text: "event=reload_failed" in text)
                assert "level=error" in failed
                assert "hook=broken" in failed
                assert "bad block list" in failed
                # The next hook now waits on the FIFO; the connection opened before the SIGHUP
                # is served meanwhile.
                answer = await send_message(client)
                assert answer.modifications == [
                    AddHeader(name="X-Pid", value=str(child.process.pid))
                ]
                await asyncio.to_thread(gate.write_text, "go")
                done = await child.line(lambda text: "event=reload " in text)
                assert "hooks=2 failed=1" in done
                assert counter.read_text() == f"{child.process.pid}\n"
                assert (await send_message(client)).verdict == Continue()
            await child.stop()

    run(body(), 60)


def test_sighup_while_starting_reloads_once_serving(
    script: Path, sock_dir: Path, tmp_path: Path
) -> None:
    path, counter, gate = sock_dir / "milter.sock", tmp_path / "counter", sock_dir / "gate"
    os.mkfifo(gate)
    args = (str(script), f"unix:{path}", "1", str(counter), str(gate), "startup")

    async def body() -> None:
        async with parent(*args) as child:
            await child.line(lambda text: "event=in_startup" in text)
            child.process.send_signal(signal.SIGHUP)  # handled: not SIGHUP's default, death
            await asyncio.to_thread(gate.write_text, "go")
            await child.line(lambda text: "event=listening" in text)
            await child.line(lambda text: "event=reload " in text)
            assert counter.read_text() == f"{child.process.pid}\n"
            await child.stop()

    run(body(), 60)


@linux
def test_sighup_to_the_parent_reloads_every_worker(
    script: Path, sock_dir: Path, tmp_path: Path
) -> None:
    path, counter = sock_dir / "milter.sock", tmp_path / "counter"

    async def body() -> None:
        async with parent(str(script), f"unix:{path}", "2", str(counter)) as child:
            # Sent as soon as the workers exist: a worker that does not handle SIGHUP yet
            # keeps it blocked until it does, instead of dying of it.
            await child.line(lambda text: "event=worker_started" in text)
            await child.line(lambda text: "event=worker_started" in text)
            child.process.send_signal(signal.SIGHUP)
            await child.line(lambda text: "event=reloading" in text)
            reloads = [await child.line(lambda text: "event=reload " in text) for _ in range(2)]
            assert all("hooks=2 failed=1" in line for line in reloads)
            pids = {int(match[1]) for line in reloads if (match := PID.search(line))}
            assert len(pids) == 2  # each worker ran the hooks, once
            assert pids != {child.process.pid}
            assert sorted(int(line) for line in counter.read_text().split()) == sorted(pids)
            rest = await child.stop()
            assert "worker_died" not in "".join(child.lines) + rest

    run(body(), 60)
