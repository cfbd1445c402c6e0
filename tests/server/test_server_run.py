"""``app.run()`` in a child process: the spec from ``--spec``, the argument or
``$MILTERAPP_SPEC``; the options of ``milterapp run`` on the command line, over those in the
code; ``--help``; readiness on stderr, SIGTERM for a clean exit, and errors as one line."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from pydantic import ValidationError

from milterapp.app import App
from milterapp.replies import AddHeader, Continue
from milterapp.server import ServerOptions
from milterapp.server.arguments import describe
from milterapp.testing import MtaClient
from tests.server.support import run, send_message, start_session

#: The spec (RUNNER_SPEC) and options (RUNNER_OPTIONS, JSON) the script passes in code; its
#: command line is app.run()'s own.
SCRIPT = textwrap.dedent(
    """
    import json
    import os

    from milterapp.app import App

    app = App("runner")

    @app.on("eom")
    def stamp(event, ctx):
        ctx.add_header("X-Runner", "yes")

    app.run(os.environ.get("RUNNER_SPEC"), **json.loads(os.environ.get("RUNNER_OPTIONS", "{}")))
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


def in_code(spec: str | None = None, **options: object) -> dict[str, str]:
    """What the script passes to app.run() in code, as its environment."""
    env = {"RUNNER_OPTIONS": json.dumps(options)}
    return {**env, "RUNNER_SPEC": spec} if spec else env


def test_run_serves_until_sigterm(script: Path, sock_dir: Path) -> None:
    path = sock_dir / "milter.sock"
    serve_and_stop([str(script)], child_env(**in_code(f"unix:{path}")), path)


def test_run_takes_spec_from_command_line(script: Path, sock_dir: Path) -> None:
    path = sock_dir / "milter.sock"
    elsewhere = f"unix:{sock_dir / 'missing' / 'x.sock'}"
    # --spec wins over the spec in the code, which wins over the environment.
    env = child_env(MILTERAPP_SPEC=elsewhere, **in_code(elsewhere))
    serve_and_stop([str(script), "--spec", f"unix:{path}"], env, path)


def test_run_takes_spec_from_environment(script: Path, sock_dir: Path) -> None:
    path = sock_dir / "milter.sock"
    env = child_env(MILTERAPP_SPEC=f"unix:{path}")
    serve_and_stop([str(script)], env, path)


def test_command_line_options_override_those_in_the_code(script: Path, sock_dir: Path) -> None:
    path = sock_dir / "milter.sock"
    env = child_env(**in_code(f"unix:{path}", timeout=-5, workers=0, loop="fast"))
    args = [str(script), "--timeout", "5", "--workers=1", "--loop", "asyncio"]
    serve_and_stop(args, env, path)


def run_child(script: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # noqa: S603 - our own fixed command line
        [sys.executable, str(script), *args],
        capture_output=True,
        text=True,
        timeout=30,
        env=child_env(**env),
        check=False,
    )


def test_help_lists_the_options_of_milterapp_run_and_exits_0(script: Path) -> None:
    result = run_child(script, "--help")
    assert result.returncode == 0
    assert result.stderr == ""
    assert result.stdout.startswith("usage: runner.py [-h] [--spec SPEC]")
    assert "Serve the milter 'runner' until SIGTERM or SIGINT." in result.stdout
    for flag in ("--workers N", "--timeout SECONDS", "--max-recipients N", "--log-level"):
        assert flag in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--workers", "0"], "--workers: must be at least 1, not 0"),
        (["--timeout", "-5"], "--timeout: must be greater than 0, not -5"),
        (["--timeout=soon"], "--timeout: must be a number, not 'soon'"),
        (["--log-format", "xml"], "--log-format: must be 'text' or 'json', not 'xml'"),
        (["--bogus"], "unrecognized arguments: --bogus"),
        (["positional"], "unrecognized arguments: positional"),
    ],
)
def test_bad_command_line_is_one_line_and_status_2(
    script: Path, args: list[str], message: str
) -> None:
    result = run_child(script, *args)
    assert result.returncode == 2
    assert result.stderr == f"runner.py: error: {message}\n"  # no usage, no traceback


def test_bad_options_in_code_are_one_line_and_status_1(script: Path) -> None:
    result = run_child(script, **in_code("inet:0@[127.0.0.1]", timeout=-5))
    assert (result.returncode, result.stderr) == (
        1,
        "milterapp: error: invalid option: timeout: must be greater than 0, not -5\n",
    )
    result = run_child(script, **in_code(None, workers=0, log_level="loud"))
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "milterapp: error: invalid option: workers: must be at least 1, not 0; log_level: "
        "must be 'DEBUG', 'INFO', 'WARNING', 'ERROR' or 'CRITICAL', not 'LOUD'"
    ]


@pytest.mark.parametrize(
    ("options", "problem"),
    [
        ({"timeout": -5}, "timeout: must be greater than 0, not -5"),
        ({"unix_socket_mode": 0o1777}, "unix_socket_mode: must be at most 0o777, not 0o1777"),
        ({"unix_socket_group": 1.5}, "unix_socket_group: must be text or a whole number, not 1.5"),
        ({"max_headers": "many"}, "max_headers: must be a whole number, not 'many'"),
        ({"bogus": 1}, "bogus: no such option"),
    ],
)
def test_options_in_code_are_described_in_our_words(
    options: dict[str, object], problem: str
) -> None:
    with pytest.raises(ValidationError) as caught:
        ServerOptions.model_validate(options)
    assert describe(caught.value) == problem


def test_run_with_argv_given_ignores_the_test_runners_command_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # sys.argv is pytest's here: run(argv=...) parses what it is given, and nothing else.
    with pytest.raises(SystemExit) as exited:
        App("in-pytest").run(argv=["--workers", "0"])
    assert exited.value.code == 2
    assert capsys.readouterr().err.endswith(": error: --workers: must be at least 1, not 0\n")
    with pytest.raises(SystemExit) as exited:
        App("in-pytest").run(argv=["--help"])
    assert exited.value.code == 0
    assert "--max-recipients N" in capsys.readouterr().out


def test_run_setup_error_is_one_line_and_status_1(script: Path, sock_dir: Path) -> None:
    spec = f"unix:{sock_dir / 'missing' / 'milter.sock'}"
    result = run_child(script, **in_code(spec))
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"milterapp: error: cannot create unix socket '{sock_dir}/missing/milter.sock': "
        f"directory '{sock_dir}/missing' does not exist"
    ]


def test_run_bad_spec_is_one_line_and_status_1(script: Path) -> None:
    result = run_child(script, **in_code("inet:bogus"))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines() == [
        "milterapp: error: invalid connection spec 'inet:bogus': port 'bogus' is not a number "
        "(for example 'inet:10025@[127.0.0.1]')"
    ]
