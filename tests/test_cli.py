"""The command line: ``milterapp demo`` and the global options."""

from __future__ import annotations

import subprocess
import sys

import pytest

from milterapp.cli import main


def test_demo_shows_accept_with_header_and_reject(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "AddHeader(name='X-Milterapp-Demo', value='checked')" in out
    assert "Reject(code=550, xcode='5.7.1', text='mail from blocked.example is refused')" in out
    # The refused transaction stops at MAIL: its RCPT is never sent.
    assert out.count("RCPT TO:<bob@example.net>") == 1
    assert "X-Milterapp-Demo: checked" in out


def test_cli_runs_as_module_and_reports_version() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "milterapp", "--version"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0
    assert result.stdout.startswith("milterapp ")


def test_cli_without_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code == 2
    assert "COMMAND" in capsys.readouterr().err
