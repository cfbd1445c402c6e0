"""Keep README.md's set-up commands and the CI entry point in step."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
CI_RUN = ROOT / ".ci" / "run"

#: How many lines from the top of README.md a newcomer should need to read.
HEAD_LINES = 40

DEMO_COMMAND = (
    "python3 -m venv .venv && .venv/bin/pip install . && .venv/bin/python -m milterapp demo"
)
TEST_COMMAND = (
    "python3 -m venv .venv && .venv/bin/pip install -e '.[test]' && .venv/bin/python -m pytest"
)
PYTEST_INVOCATION = ".venv/bin/python -m pytest"


def _readme_head() -> list[str]:
    return README.read_text(encoding="utf-8").splitlines()[:HEAD_LINES]


def _ci_commands() -> list[str]:
    lines = CI_RUN.read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def test_readme_head_has_demo_command() -> None:
    assert DEMO_COMMAND in _readme_head()


def test_readme_head_has_test_command() -> None:
    assert TEST_COMMAND in _readme_head()


def test_readme_commands_are_fenced() -> None:
    head = _readme_head()
    for command in (DEMO_COMMAND, TEST_COMMAND):
        index = head.index(command)
        assert head[index - 1].startswith("```"), f"{command!r} is not in a code block"
        assert head[index + 1] == "```", f"{command!r} is not in a code block"


def test_readme_test_command_runs_in_ci() -> None:
    assert TEST_COMMAND.endswith(PYTEST_INVOCATION)
    assert any(command.startswith(PYTEST_INVOCATION) for command in _ci_commands()), (
        f".ci/run must run {PYTEST_INVOCATION!r}, the README's test command"
    )


def test_ci_run_is_strict_and_executable() -> None:
    text = CI_RUN.read_text(encoding="utf-8")
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in text
    assert CI_RUN.stat().st_mode & 0o111, ".ci/run must be executable"
