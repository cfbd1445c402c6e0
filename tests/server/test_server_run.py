"""``app.run()`` in a child process: spec from the argument, ``--spec`` or ``$MILTERAPP_SPEC``,
readiness on stderr, SIGTERM for a clean exit, and setup errors as one line with status 1."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from milterapp.replies import AddHeader, Continue
from milterapp.testing import MtaClient
from tests.server.support import run, send_message, start_session

SCRIPT = textwrap.dedent(
    """
    import sys

    from milterapp.app import App

    app = App("runner")

    @app.on("eom")
    def stamp(event, ctx):
        ctx.add_header("X-Runner", "yes")

    mode = sys.argv[1]
    if mode == "argument":
        app.run(sys.argv[2])
    else:  # the spec comes from --spec or $MILTERAPP_SPEC
        app.run()
    """
)


@pytest.fixture
def script(tmp_path: Path) -> Path:
    path = tmp_path / "runner.py"
    path.write_text(SCRIPT)
    return path


def child_env(**extra: str) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if key != "MILTERAPP_SPEC" and not key.startswith("LISTEN_")
    }
    env.update(extra)
    return env


async def serve_in_child(args: list[str], env: dict[str, str], path: Path) -> None:
    """Start the runner, wait for "listening", get one message answered, then SIGTERM it."""
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    assert child.stderr is not None
    try:
        lines: list[str] = []
        while not any("listening" in line for line in lines):
            line = (await child.stderr.readline()).decode()
            assert line, f"the child exited before listening: {''.join(lines)}"
            lines.append(line)
        assert f"listen=unix:{path}" in lines[-1]
        async with await MtaClient.connect(f"unix:{path}", timeout=5) as client:
            await start_session(client)
            answer = await send_message(client)
            assert answer.modifications == [AddHeader(name="X-Runner", value="yes")]
            assert answer.verdict == Continue()
        child.send_signal(signal.SIGTERM)
        rest = (await child.stderr.read()).decode()
        assert await child.wait() == 0, rest
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()
    assert "stopped" in rest
    assert "Traceback" not in rest


def serve_and_stop(args: list[str], env: dict[str, str], path: Path) -> None:
    run(serve_in_child(args, env, path), 30)
    assert not os.path.lexists(path)  # removed at the graceful exit


def test_run_serves_until_sigterm(script: Path, sock_dir: Path) -> None:
    path = sock_dir / "milter.sock"
    serve_and_stop([str(script), "argument", f"unix:{path}"], child_env(), path)


def test_run_takes_spec_from_command_line(script: Path, sock_dir: Path) -> None:
    path = sock_dir / "milter.sock"
    args = [str(script), "from-elsewhere", "--spec", f"unix:{path}"]
    # --spec wins over the environment.
    env = child_env(MILTERAPP_SPEC=f"unix:{sock_dir / 'missing' / 'x.sock'}")
    serve_and_stop(args, env, path)


def test_run_takes_spec_from_environment(script: Path, sock_dir: Path) -> None:
    path = sock_dir / "milter.sock"
    env = child_env(MILTERAPP_SPEC=f"unix:{path}")
    serve_and_stop([str(script), "from-elsewhere"], env, path)


def run_child(script: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # noqa: S603 - our own fixed command line
        [sys.executable, str(script), *args],
        capture_output=True,
        text=True,
        timeout=30,
        env=child_env(),
        check=False,
    )


def test_run_setup_error_is_one_line_and_status_1(script: Path, sock_dir: Path) -> None:
    spec = f"unix:{sock_dir / 'missing' / 'milter.sock'}"
    result = run_child(script, "argument", spec)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"milterapp: error: cannot create unix socket '{sock_dir}/missing/milter.sock': "
        f"directory '{sock_dir}/missing' does not exist"
    ]


def test_run_bad_spec_is_one_line_and_status_1(script: Path) -> None:
    result = run_child(script, "argument", "inet:bogus")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines() == [
        "milterapp: error: invalid connection spec 'inet:bogus': port 'bogus' is not a number "
        "(for example 'inet:10025@[127.0.0.1]')"
    ]
