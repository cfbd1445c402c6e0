"""The command line: demo, run, send, and one-line errors."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import milterapp
from milterapp import App, Context, EndOfMessage, EnvFrom, Reject
from milterapp.cli import main
from milterapp.server.limits import Limits
from milterapp.server.options import ServerOptions
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
        ("json:app", "not a milterapp App"),
    ],
)
def test_run_bad_target_is_one_line(
    target: str, problem: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["run", target]) == 2
    err = capsys.readouterr().err
    assert problem in err
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
