"""The command line: demo, run, send, and one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

import milterapp
from milterapp import App, Context, EndOfMessage, EnvFrom, Reject
from milterapp.cli import main
from milterapp.server.limits import Limits
from milterapp.server.options import RunOptions, ServerOptions
from milterapp.testing.sockets import ServerThread


def test_demo_runs_a_real_milter_and_shows_three_outcomes(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "listens on unix:" in out
    assert out.count("+X-Milterapp-Demo: checked") == 2  # stamped and rewritten
    assert "Reject(code=550, xcode='5.7.1', text='mail from spam.example is refused')" in out
    assert "-My card is 4111 1111 1111 1111, please charge it." in out
    assert "+My card is [card number removed], please charge it." in out
    assert "+Subject: [redacted] card number" in out


def test_demo_wire_shows_the_packets(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--wire"]) == 0
    out = capsys.readouterr().out
    assert "AddHeader(name='X-Milterapp-Demo', value='checked')" in out
    assert out.count("RCPT TO:<bob@example.net>") == 1  # the refused transaction stops at MAIL


def test_cli_runs_as_module_and_reports_version() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "milterapp", "--version"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0
    assert result.stdout.startswith("milterapp ")
    build = "compiled with mypyc" if milterapp.COMPILED else "pure Python"
    assert result.stdout.rstrip().endswith(f"({build})")


def test_cli_without_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code == 2
    assert "COMMAND" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["run", "send", "demo", "record"])
def test_cli_every_command_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    assert "usage: milterapp" in capsys.readouterr().out


def guard_app() -> App:
    app = App("guard")

    @app.on("envfrom")
    def refuse(event: EnvFrom) -> Reject | None:
        return (
            Reject(code=550, xcode="5.7.1", text="go away")
            if event.domain == "bad.example"
            else None
        )

    @app.on("eom")
    def stamp(event: EndOfMessage, ctx: Context) -> None:
        ctx.add_header("X-Guard", "ok")

    return app


def test_send_shows_answers_verdict_and_diff(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    message = tmp_path / "m.eml"
    message.write_bytes(b"From: a@example.org\r\nSubject: hi\r\n\r\nHello.\r\n")
    with ServerThread(guard_app(), "inet:0@[127.0.0.1]") as server:
        host, port = server.address
        spec = f"inet:{port}@[{host}]"
        assert main(["send", "--spec", spec, "--from", "a@example.org", str(message)]) == 0
        out = capsys.readouterr().out
        assert (
            main(["send", "--spec", spec, "--from", "x@bad.example", "--json", str(message)]) == 0
        )
        refused = capsys.readouterr().out
    assert "verdict  Continue at eom" in out
    assert "+X-Guard: ok" in out
    assert '"verdict": "Reject"' in refused
    assert '"stage": "envfrom"' in refused


def test_send_to_nothing_is_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    message = tmp_path / "m.eml"
    message.write_bytes(b"Subject: x\r\n\r\nx\r\n")
    status = main(["send", "--spec", f"unix:{tmp_path}/nothing.sock", str(message)])
    err = capsys.readouterr().err
    assert status == 1
    assert err.startswith("milterapp: error: cannot talk to the milter")
    assert err.count("\n") == 1


def test_send_bad_spec_and_missing_file_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["send", "--spec", "bogus:1", str(tmp_path / "missing.eml")]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    message = tmp_path / "m.eml"
    message.write_bytes(b"Subject: x\r\n\r\nx\r\n")
    assert main(["send", "--spec", "bogus:1", str(message)]) == 1
    err = capsys.readouterr().err
    assert "invalid connection spec 'bogus:1'" in err
    assert err.count("\n") == 1


@pytest.mark.parametrize(
    ("target", "problem"),
    [
        ("no_such_module_xyz:app", "module 'no_such_module_xyz' not found"),
        ("json:app", "module 'json' has no attribute 'app'"),
        ("json", "module 'json' has no attribute 'app'"),
        ("json:dumps", "json:dumps is a function, not a milterapp App"),
        ("json:JSONDecoder", "json:JSONDecoder is a class, not a milterapp App"),
        (".relative", "'.relative' is neither a module name nor a path to a .py file"),
    ],
)
def test_run_bad_target_is_one_line(
    target: str, problem: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["run", target]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"milterapp: error: {problem}")
    assert err.count("\n") == 1


def test_run_serves_a_module_app_until_sigterm(tmp_path: Path) -> None:
    (tmp_path / "mymilter.py").write_text(
        textwrap.dedent(
            """
            from milterapp import App
            app = App("from-module")
            """
        )
    )
    socket_path = tmp_path / "m.sock"
    process = subprocess.Popen(  # noqa: S603 - our own interpreter and module
        [sys.executable, "-m", "milterapp", "run", "mymilter:app", "--spec", f"unix:{socket_path}"],
        cwd=tmp_path,
        stderr=subprocess.PIPE,
        text=True,
    )
    with process:
        try:
            assert process.stderr is not None
            line = process.stderr.readline()  # blocks until the server logs that it listens
            assert "listening" in line
            assert socket_path.exists()
        finally:
            process.terminate()
            assert process.wait(timeout=30) == 0
    assert not socket_path.exists()


def test_record_command_records_until_sigterm(tmp_path: Path) -> None:
    from milterapp.testing.recording import load_recording

    out = tmp_path / "session.jsonl"
    listen = f"unix:{tmp_path}/proxy.sock"
    with ServerThread(guard_app(), "inet:0@[127.0.0.1]") as server:
        host, port = server.address
        upstream = f"inet:{port}@[{host}]"
        process = subprocess.Popen(  # noqa: S603 - our own interpreter and module
            [
                sys.executable,
                "-m",
                "milterapp",
                "record",
                "--listen",
                listen,
                "--upstream",
                upstream,
                "--out",
                str(out),
            ],
            stderr=subprocess.PIPE,
            text=True,
        )
        with process:
            try:
                assert process.stderr is not None
                while "recording" not in (line := process.stderr.readline()):
                    assert line, "the recorder exited before listening"
                message = tmp_path / "m.eml"
                message.write_bytes(b"Subject: hi\r\n\r\nhello\r\n")
                assert main(["send", "--spec", listen, str(message)]) == 0
            finally:
                process.terminate()
                assert process.wait(timeout=30) == 0
    recording = load_recording(out)
    assert len(recording.connections) == 1
    commands = [p.cmd for p in recording.connections[0].packets if p.dir == "mta"]
    assert commands[0] == "O"
    assert "E" in commands


def test_cli_server_flags_and_their_defaults_come_from_the_models(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for name, field in Limits.model_fields.items():
        default = field.default
        shown = f"{default:g}" if isinstance(default, float) else str(default)
        flag = "--" + name.replace("_", "-")
        assert f"{flag} " in help_text
        assert f"{field.description} (default: {shown})" in help_text, name
    assert "(default: 660)" in help_text  # the unix socket mode, in octal
    assert f"(default: {ServerOptions().backlog})" in help_text


# --- milterapp run PATH.py, and a module that cannot be imported ------------------------------

GUARD = textwrap.dedent(
    """
    from milterapp import App
    from guard_words import BLOCKED  # a sibling module

    app = App("guard-file")
    NAME = "guard"
    """
)


@pytest.fixture
def other_dir(tmp_path: Path) -> Path:
    """``tmp_path/other`` holds guard.py and its sibling; ``tmp_path/here`` is empty."""
    other = tmp_path / "other"
    other.mkdir()
    (other / "guard.py").write_text(GUARD)
    (other / "guard_words.py").write_text("BLOCKED = {'spam.example'}\n")
    (tmp_path / "here").mkdir()
    return other


@pytest.fixture
def isolated_imports(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Modules the test imports, and what it puts on sys.path, are gone after it."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        del sys.modules[name]


@pytest.mark.parametrize(
    "target",
    ["../other/guard.py", "../other/guard.py:app", "{other}/guard.py", "{other}/guard.py:app"],
)
def test_run_serves_a_file_from_another_directory(
    target: str, other_dir: Path, sock_dir: Path
) -> None:
    socket_path = sock_dir / "m.sock"
    command = ["run", target.format(other=other_dir), "--spec", f"unix:{socket_path}"]
    process = subprocess.Popen(  # noqa: S603 - our own interpreter and module
        [sys.executable, "-m", "milterapp", *command],
        cwd=other_dir.parent / "here",
        stderr=subprocess.PIPE,
        text=True,
    )
    with process:
        try:
            assert process.stderr is not None
            line = process.stderr.readline()  # blocks until the server logs that it listens
            assert "event=listening app=guard-file" in line, line + process.stderr.read()
        finally:
            process.terminate()
            assert process.wait(timeout=30) == 0


@pytest.mark.usefixtures("isolated_imports")
@pytest.mark.parametrize(
    ("attribute", "problem"),
    [
        (":NAME", "{target}:NAME is a str, not a milterapp App"),
        (":BLOCKED", "{target}:BLOCKED is a set, not a milterapp App"),
        (":nothing", "{target} has no attribute 'nothing'"),
        ("", "{target} has no attribute 'app'"),
    ],
)
def test_run_file_whose_attribute_is_not_an_app_says_what_it_is(
    attribute: str,
    problem: str,
    other_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(other_dir.parent / "here")
    (other_dir / "guard.py").write_text(GUARD.replace('app = App("guard-file")', ""))
    target = "../other/guard.py"
    assert main(["run", target + attribute]) == 2
    assert capsys.readouterr().err == f"milterapp: error: {problem.format(target=target)}\n"


def test_run_missing_file_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", f"{tmp_path}/missing.py:app"]) == 2
    assert (
        capsys.readouterr().err
        == f"milterapp: error: cannot load {tmp_path}/missing.py: no such file\n"
    )
    assert main(["run", str(tmp_path)]) == 2
    assert (
        capsys.readouterr().err == f"milterapp: error: cannot load {tmp_path}: it is a directory\n"
    )


@pytest.mark.usefixtures("isolated_imports")
@pytest.mark.parametrize("by_name", [False, True])
@pytest.mark.parametrize(
    ("source", "problem"),
    [
        ("import os\nfrom milterapp import App(\n", "{file}, line 2: invalid syntax"),
        (
            "x = 1\nimport no_such_dependency_xyz\n",
            "{file}, line 2: No module named 'no_such_dependency_xyz'",
        ),
        (
            "from os import no_such_name\n",
            "{file}, line 1: cannot import name 'no_such_name' from 'os' ({os})",
        ),
    ],
)
def test_run_module_failing_to_import_is_one_line_with_file_and_line(
    source: str,
    problem: str,
    by_name: bool,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    file = tmp_path / "broken_milter.py"
    file.write_text(source)
    monkeypatch.chdir(tmp_path)
    target = "broken_milter" if by_name else str(file)
    label = "module 'broken_milter'" if by_name else str(file)
    assert main(["run", target]) == 1
    expected = problem.format(file=file, os=os.__file__)
    assert capsys.readouterr().err == f"milterapp: error: cannot import {label}: {expected}\n"


@pytest.mark.usefixtures("isolated_imports")
def test_run_module_raising_on_import_shows_its_traceback_then_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    file = tmp_path / "raising_milter.py"
    file.write_text("def setting():\n    return {}['REDIS_URL']\n\n\nURL = setting()\n")
    monkeypatch.chdir(tmp_path)
    assert main(["run", "raising_milter"]) == 1
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "Traceback (most recent call last):"
    assert lines[1] == f'  File "{file}", line 5, in <module>'  # its frames, not ours
    assert "milterapp" not in "\n".join(lines[:-1])
    assert lines[-2] == "KeyError: 'REDIS_URL'"
    assert lines[-1] == (
        "milterapp: error: cannot import module 'raising_milter': KeyError: 'REDIS_URL' "
        "(traceback above)"
    )


# --- bad values on the command line: one line, in our words ------------------------------------


def usage_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """What the command line says of ``argv``, which must be a usage error (status 2)."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    return captured.err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--workers", "0"], "--workers: must be at least 1, not 0"),
        (["--workers", "two"], "--workers: must be a whole number, not 'two'"),
        (["--timeout", "-5"], "--timeout: must be greater than 0, not -5"),
        (["--timeout", "nan"], "--timeout: must be greater than 0, not nan"),
        (["--read-timeout=-1"], "--read-timeout: must be at least 0, not -1"),
        (["--max-data-size", "100"], "--max-data-size: must be at least 65535, not 100"),
        (["--unix-socket-mode", "1777"], "--unix-socket-mode: must be at most 777, not 1777"),
        (
            ["--unix-socket-mode", "9"],
            "--unix-socket-mode: must be an octal mode like 660, not '9'",
        ),
        (["--loop", "fast"], "--loop: must be 'auto', 'asyncio' or 'uvloop', not 'fast'"),
        (
            ["--log-level", "loud"],
            "--log-level: must be 'DEBUG', 'INFO', 'WARNING', 'ERROR' or 'CRITICAL', not 'loud'",
        ),
        (["--timeout"], "--timeout: expected one argument"),
    ],
)
def test_run_bad_option_value_is_one_line_in_our_words(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    err = usage_error(["run", "mymilter:app", *args], capsys)
    assert err == f"milterapp run: error: {message}\n"


def test_every_bounded_server_option_is_refused_in_one_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    fields = {**ServerOptions.model_fields, **Limits.model_fields, **RunOptions.model_fields}
    bounded = [name for name, field in fields.items() if field.metadata and name != "limits"]
    assert len(bounded) > 10
    for name in bounded:
        flag = "--" + name.replace("_", "-")
        for value in ("-1", "x"):
            err = usage_error(["run", "mymilter:app", f"{flag}={value}"], capsys)
            assert err.startswith(f"milterapp run: error: {flag}: must be "), err
            assert err.endswith(f", not {value if value == '-1' else repr(value)}\n"), err
            assert err.count("\n") == 1
            assert "Input should" not in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--timeout", "-1"], "--timeout: must be greater than 0, not -1"),
        (["--timeout", "0"], "--timeout: must be greater than 0, not 0"),
        (
            ["--client-address", "client.example"],
            "--client-address: must be an IPv4 or IPv6 address, not 'client.example'",
        ),
    ],
)
def test_send_bad_option_value_is_one_line(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    err = usage_error(["send", "--spec", "unix:/nowhere", "m.eml", *args], capsys)
    assert err == f"milterapp send: error: {message}\n"


def test_send_unreadable_message_says_why(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["send", "--spec", "unix:/nowhere", str(tmp_path / "missing.eml")]) == 2
    assert capsys.readouterr().err == (
        f"milterapp: error: cannot read {tmp_path}/missing.eml: no such file\n"
    )
    assert main(["send", "--spec", "unix:/nowhere", str(tmp_path)]) == 2
    assert (
        capsys.readouterr().err == f"milterapp: error: cannot read {tmp_path}: it is a directory\n"
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--connections", "x"], "--connections: must be a whole number, not 'x'"),
        (["--duration", "soon"], "--duration: must be a number, not 'soon'"),
        (["--duration", "nan"], "--duration: must be at least 0, not nan"),
        (
            ["--messages-per-connection", "0"],
            "--messages-per-connection: must be at least 1, not 0",
        ),
        (["--timeout", "0"], "--timeout: must be greater than 0, not 0"),
    ],
)
def test_bench_bad_option_value_is_one_line(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["bench", "--spec", "unix:/nowhere", *args]
    try:
        status = main(argv)
    except SystemExit as exc:  # refused while parsing
        status = exc.code
    assert status == 2
    assert capsys.readouterr().err == f"milterapp bench: error: {message}\n"


def test_record_to_a_missing_directory_is_one_line(tmp_path: Path) -> None:
    out = tmp_path / "missing" / "dir" / "r.jsonl"
    result = subprocess.run(  # noqa: S603 - our own interpreter and module
        [
            sys.executable,
            "-m",
            "milterapp",
            "record",
            "--listen",
            f"unix:{tmp_path}/proxy.sock",
            "--upstream",
            "inet:1@[127.0.0.1]",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr == (
        f"milterapp: error: cannot write {out}: directory '{out.parent}' does not exist\n"
    )
    assert not (tmp_path / "proxy.sock").exists()
