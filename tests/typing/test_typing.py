"""Static typing of handler registration, checked by running mypy (Flask-style typing tests).

good_handlers.py must type-check cleanly under ``mypy --strict``; every misuse in
bad_handlers.py carries the ``# type: ignore[code]`` of the error mypy gives it, and
``--warn-unused-ignores`` turns an ignore that silences nothing into an error. So exit code 0
means: all good handlers are accepted and every bad one is caught.

mypy runs from the repository root, so pyproject.toml's [tool.mypy] section (strict, the
pydantic plugin) applies. ``--follow-imports=silent`` keeps errors inside milterapp itself out
of this test (CI checks the package with ``mypy --strict milterapp``).
"""

from __future__ import annotations

import asyncio
import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from milterapp.handlers import ALIASES, EVENT_NAMES

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
GOOD = HERE / "good_handlers.py"
BAD = HERE / "bad_handlers.py"
IGNORE = re.compile(r"#\s*type:\s*ignore\[([a-z-]+)\]")


def mypy(*files: Path, cache_dir: Path) -> subprocess.CompletedProcess[str]:
    try:
        import mypy.api  # noqa: F401 - only to know whether mypy is installed
    except ImportError as exc:
        print(f"skipping: mypy is not importable ({exc}); pip install -e '.[test]'")
        pytest.skip(f"mypy is not importable: {exc}")
    command = [
        sys.executable,
        "-m",
        "mypy",
        "--strict",
        "--warn-unused-ignores",
        "--follow-imports=silent",
        "--no-error-summary",
        "--show-error-codes",
        "--cache-dir",
        str(cache_dir),
        *(str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path) for path in files),
    ]
    return subprocess.run(  # noqa: S603 - our own interpreter, fixed arguments
        command, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )


def report(result: subprocess.CompletedProcess[str]) -> str:
    return f"mypy exit code {result.returncode}\n{result.stdout}{result.stderr}"


def test_good_handlers_pass_and_every_bad_handler_is_caught(tmp_path: Path) -> None:
    result = mypy(GOOD, BAD, cache_dir=tmp_path / "cache")
    output = report(result)
    print(output)
    assert result.returncode == 0, output


def test_each_ignore_in_bad_handlers_silences_an_error_on_its_line(tmp_path: Path) -> None:
    """The same proof the other way round: without the ignores, mypy reports exactly the
    ignored lines, with the ignored codes."""
    source = BAD.read_text()
    expected: set[tuple[int, str]] = set()
    for number, line in enumerate(source.splitlines(), start=1):
        found = IGNORE.search(line)
        if found:
            expected.add((number, found.group(1)))
    assert len(expected) >= 3
    stripped = tmp_path / "bad_handlers_stripped.py"
    stripped.write_text(IGNORE.sub("", source))
    result = mypy(stripped, cache_dir=tmp_path / "cache")
    output = report(result)
    print(output)
    assert result.returncode == 1, output
    reported = {
        (int(found.group(1)), found.group(2))
        for found in re.finditer(r":(\d+): error: .*\[([a-z-]+)\]$", result.stdout, re.M)
    }
    assert reported == expected, output


def load(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"typing_check_{path.stem}", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being made
    spec.loader.exec_module(module)
    return module


def test_good_handlers_register_every_event_at_run_time() -> None:
    good = load(GOOD)
    app = good.app
    assert set(good.NAMES_REGISTERED) == set(EVENT_NAMES)
    for name in (*EVENT_NAMES, *ALIASES):
        assert app.handles(name), name
    assert asyncio.run(good.still_callable()) is None


def test_typing_files_are_not_collected_as_tests() -> None:
    for path in (GOOD, BAD):
        assert not path.name.startswith("test_")
        assert not path.name.endswith("_test.py")
