"""``app.run(spec, workers=N)`` in a child process: N workers share one socket, a worker that
dies is replaced, SIGTERM stops them all gracefully, and a crash loop ends with status 1.

Nothing sleeps: the tests wait for log lines on stderr, for the milter's answers and for
the processes' exit, each bounded by the test timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from milterapp.events import EndOfMessage
from milterapp.replies import AddHeader, Continue
from milterapp.testing import MtaClient
from tests.server.support import message_events, run, send, send_message, start_session

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="workers use fork() (Linux)")

SCRIPT = textwrap.dedent(
    """
    import asyncio
    import os
    import sys
    from pathlib import Path

    from milterapp.app import App

    app = App("workers")
    mode = sys.argv[3] if len(sys.argv) > 3 else "plain"

    @app.on("eom")
    async def stamp(event, ctx):
        if mode == "slow":  # wait until the test writes to the FIFO
            ctx.log.info("in_eom")
            await asyncio.to_thread(Path(sys.argv[4]).read_text)
        ctx.add_header("X-Pid", str(os.getpid()))

    if mode == "broken":
        @app.on_startup
        async def fail():
            raise RuntimeError("no database")

    if __name__ == "__main__":
        app.run(sys.argv[1], workers=int(sys.argv[2]), argv=[])  # argv: the test's own
    """
)


PID = re.compile(r"\bpid=(\d+)")
STARTED = re.compile(r"event=worker_started .*\bpid=(\d+)")


@pytest.fixture
def script(tmp_path: Path) -> Path:
    path = tmp_path / "workers_app.py"
    path.write_text(SCRIPT)
    return path


def child_env() -> dict[str, str]:
    return {
        key: value
        for key, value in os.environ.items()
        if key != "MILTERAPP_SPEC" and not key.startswith("LISTEN_")
    }


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Child:
    """The parent process under test, with its stderr read line by line."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.lines: list[str] = []
        self.worker_pids: set[int] = set()

    async def line(self, predicate: Callable[[str], bool], within: float = 30) -> str:
        """Read stderr until a line matches ``predicate``; return it."""
        assert self.process.stderr is not None
        while True:
            try:
                async with asyncio.timeout(within):
                    line = (await self.process.stderr.readline()).decode()
            except TimeoutError:
                pytest.fail(f"no such line within {within} s; stderr so far:\n{self.seen()}")
            assert line, f"the parent exited early:\n{self.seen()}"
            self.lines.append(line)
            if match := STARTED.search(line):
                self.worker_pids.add(int(match[1]))  # killed by the clean-up if a test fails
            if predicate(line):
                return line

    def seen(self) -> str:
        return "".join(self.lines) or "(nothing)"

    async def listening(self, count: int) -> list[int]:
        """Wait for ``count`` more workers to listen; return their pids."""
        lines = [await self.line(lambda text: "event=listening" in text) for _ in range(count)]
        pids = []
        for line in lines:
            match = PID.search(line)
            assert match, line
            pids.append(int(match[1]))
        self.worker_pids.update(pids)
        return pids

    async def stop(self) -> str:
        """SIGTERM the parent; return the rest of stderr once it exited with status 0."""
        assert self.process.stderr is not None
        self.process.send_signal(signal.SIGTERM)
        rest = (await self.process.stderr.read()).decode()
        assert await self.process.wait() == 0, "".join(self.lines) + rest
        assert "Traceback" not in rest
        assert rest.splitlines()[-1].count("event=stopped") == 1
        return rest


@contextlib.asynccontextmanager
async def parent(*args: str, cwd: Path | None = None) -> AsyncIterator[Child]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env=child_env(),
        cwd=cwd,
    )
    child = Child(process)
    try:
        yield child
    finally:
        if process.returncode is None:
            # A failed test: kill the parent and every worker it started, or orphaned workers
            # would hold the stderr pipe open and wait() would never return.
            process.kill()
            for pid in child.worker_pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            await asyncio.wait_for(process.wait(), 30)


async def stamp(target: str | tuple[str, int], clients: list[MtaClient]) -> int:
    """Send one message on a new connection, left open; return the pid that stamped it."""
    client = await MtaClient.connect(target, timeout=5)
    clients.append(client)
    await start_session(client)
    answer = await send_message(client)
    assert answer.verdict == Continue()
    [header] = answer.modifications
    assert isinstance(header, AddHeader)
    assert header.name == "X-Pid"
    return int(header.value)


async def pids_answering(target: str | tuple[str, int], wanted: set[int]) -> None:
    """Open connections until every pid in ``wanted`` has answered one (at most 200)."""
    clients: list[MtaClient] = []
    seen: set[int] = set()
    try:
        for _ in range(200):
            seen.add(await stamp(target, clients))
            assert seen <= wanted
            if seen == wanted:
                return
        pytest.fail(f"only {seen} of {wanted} answered")
    finally:
        for client in clients:
            await client.close()


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_workers_share_a_unix_socket_are_replaced_and_stop(script: Path, sock_dir: Path) -> None:
    path = sock_dir / "milter.sock"
    target = f"unix:{path}"

    async def body() -> None:
        async with parent(str(script), target, "2") as child:
            pids = await child.listening(2)
            assert len(set(pids)) == 2
            await pids_answering(target, set(pids))

            victim, survivor = pids
            os.kill(victim, signal.SIGKILL)
            died = await child.line(lambda text: "event=worker_died" in text)
            assert f"pid={victim}" in died
            assert 'status="signal SIGKILL"' in died
            [replacement] = await child.listening(1)
            assert replacement not in pids
            await pids_answering(target, {survivor, replacement})

            rest = await child.stop()
            assert rest.count("event=stopped") == 3  # two workers, then the parent
            for pid in (survivor, replacement):
                assert gone(pid)

    run(body(), 60)
    assert not os.path.lexists(path)


async def exited(pid: int) -> None:
    """Wait, without polling, until process ``pid`` (not our child) has exited."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    loop.add_reader(fd, done.set_result, None)  # a pidfd is readable once the process exited
    try:
        await done
    finally:
        loop.remove_reader(fd)
        os.close(fd)


def test_workers_stop_when_the_parent_is_killed(script: Path, sock_dir: Path) -> None:
    path = sock_dir / "milter.sock"

    async def body() -> None:
        async with parent(str(script), f"unix:{path}", "2") as child:
            pids = await child.listening(2)
            child.process.kill()  # SIGKILL: the parent cannot tell its workers anything
            await child.process.wait()
            for pid in pids:
                await exited(pid)
            rest = (await child.process.stderr.read()).decode()  # type: ignore[union-attr]
            assert rest.count("event=parent_gone") == 2, rest
            assert rest.count("event=stopped") == 2, rest

    run(body(), 60)


def test_workers_share_an_inet_socket(script: Path) -> None:
    port = free_port()

    async def body() -> None:
        async with parent(str(script), f"inet:{port}@[127.0.0.1]", "2") as child:
            pids = await child.listening(2)
            await pids_answering(("127.0.0.1", port), set(pids))
            await child.stop()
            assert all(gone(pid) for pid in pids)

    run(body(), 60)


def test_a_message_in_flight_at_sigterm_gets_its_answer(script: Path, sock_dir: Path) -> None:
    path = sock_dir / "milter.sock"
    fifo = sock_dir / "go"
    os.mkfifo(fifo)

    async def body() -> None:
        async with parent(str(script), f"unix:{path}", "2", "slow", str(fifo)) as child:
            pids = await child.listening(2)
            async with await MtaClient.connect(f"unix:{path}", timeout=30) as client:
                await start_session(client)
                for event in message_events():
                    await send(client, event)
                answer = asyncio.create_task(client.send(EndOfMessage()))
                await child.line(lambda text: "event=in_eom" in text)
                child.process.send_signal(signal.SIGTERM)
                await child.line(lambda text: "event=draining" in text)
                await asyncio.to_thread(fifo.write_text, "go")
                result = await answer
                assert result is not None
                assert result.verdict == Continue()
                [header] = result.modifications
                assert isinstance(header, AddHeader)
                assert header.name == "X-Pid"
            assert child.process.stderr is not None
            rest = (await child.process.stderr.read()).decode()
            assert await child.process.wait() == 0, rest
            assert all(gone(pid) for pid in pids)

    run(body(), 60)
    assert not os.path.lexists(path)


def test_cli_run_with_workers(sock_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "stamper.py").write_text(SCRIPT)
    path = sock_dir / "milter.sock"
    args = ["-m", "milterapp", "run", "stamper:app", "--workers", "2", "--spec", f"unix:{path}"]

    async def body() -> None:
        async with parent(*args, cwd=tmp_path) as child:
            pids = await child.listening(2)
            await pids_answering(f"unix:{path}", set(pids))
            await child.stop()

    run(body(), 60)
    assert not os.path.lexists(path)


def run_child(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # noqa: S603 - our own fixed command line
        [sys.executable, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=child_env(),
        cwd=cwd,
        check=False,
    )


def test_a_crash_loop_stops_with_status_1(script: Path, sock_dir: Path) -> None:
    path = sock_dir / "milter.sock"
    result = run_child(str(script), f"unix:{path}", "2", "broken")
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert (
        "milterapp: error: worker 1: startup hook of 'workers' failed: RuntimeError('no database')"
        in lines
    )
    assert lines[-1] == (
        "milterapp: error: workers died within 1 s of starting 6 times in a row; "
        "stopping (see the log above)"
    )
    assert not os.path.lexists(path)


def test_workers_must_be_at_least_1(script: Path, sock_dir: Path, tmp_path: Path) -> None:
    result = run_child(str(script), f"unix:{sock_dir / 'milter.sock'}", "0")
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "milterapp: error: invalid option: workers: must be at least 1, not 0"
    ]
    (tmp_path / "stamper.py").write_text(SCRIPT)
    result = run_child("-m", "milterapp", "run", "stamper:app", "--workers", "0", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr == "milterapp run: error: --workers: must be at least 1, not 0\n"
