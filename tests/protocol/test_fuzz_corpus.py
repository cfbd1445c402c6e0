"""The decoder fuzz target (fuzz/fuzz_decoder.py): its corpus and crashes replayed, and a
bounded coverage-guided run.

Every file of ``fuzz/corpus/`` (the seed corpus) and ``fuzz/crashes/`` (reproducers of crashes
the fuzzer found, kept as regression tests) goes through the target, which raises on a bug.
The bounded run fuzzes for ``MILTERAPP_FUZZ_SECONDS`` (20 by default) with atheris; without
atheris it is skipped, except under CI, where it fails.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

FUZZ = Path(__file__).resolve().parents[2] / "fuzz"
CORPUS = FUZZ / "corpus"
CRASHES = FUZZ / "crashes"
SECONDS = int(os.environ.get("MILTERAPP_FUZZ_SECONDS", "20"))


def _target() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fuzz_decoder", FUZZ / "fuzz_decoder.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TARGET = _target()


def _inputs(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(
        p for p in folder.iterdir() if p.is_file() and not p.name.startswith((".", "README"))
    )


CORPUS_FILES = _inputs(CORPUS)
#: Every input replayed: the seed corpus, then the crash reproducers (regression tests).
REPLAYED = CORPUS_FILES + _inputs(CRASHES)


def test_corpus_is_there() -> None:
    assert len(CORPUS_FILES) >= 10
    assert any(p.name.startswith("valid-") for p in CORPUS_FILES)


@pytest.mark.parametrize("path", REPLAYED, ids=[f"{p.parent.name}/{p.name}" for p in REPLAYED])
def test_input_decodes_without_crash(path: Path) -> None:
    TARGET.check(path.read_bytes())


@pytest.mark.parametrize(
    "path", [p for p in CORPUS_FILES if p.name.startswith("valid-")], ids=lambda p: p.name
)
def test_valid_seed_sessions_run_to_their_end(path: Path) -> None:
    """The valid seeds reach the end of the session: the fuzzer starts from deep states."""
    data = path.read_bytes()
    assert TARGET.check_machine(data[0], data[1:])


def test_bounded_fuzz_run(tmp_path: Path) -> None:
    """Coverage-guided fuzzing for a bounded time finds no crash."""
    if importlib.util.find_spec("atheris") is None:
        reason = "atheris is not installed (pip install atheris)"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI must run the fuzzer")
        print(f"skipped: {reason}")
        pytest.skip(reason)
    work = tmp_path / "work"  # libFuzzer adds new inputs to the first folder: not the corpus
    work.mkdir()
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    command = [
        sys.executable,
        str(FUZZ / "fuzz_decoder.py"),
        f"-max_total_time={SECONDS}",
        f"-artifact_prefix={artifacts}/",
        "-print_final_stats=1",
        str(work),
        str(CORPUS),
    ]
    result = subprocess.run(  # noqa: S603 - our own interpreter and script
        command,
        capture_output=True,
        text=True,
        timeout=SECONDS + 120,
        check=False,
        cwd=tmp_path,
    )
    output = result.stderr + result.stdout
    crashes = sorted(artifacts.iterdir())
    done = [line for line in output.splitlines() if line.startswith(("Done ", "stat::"))]
    print("\n".join(done))
    assert not crashes, (
        f"the fuzzer found a crash (exit {result.returncode}); copy the reproducer into "
        f"fuzz/crashes/ to keep it as a regression test: {[str(p) for p in crashes]}\n"
        + output[-4000:]
    )
    assert result.returncode == 0, output[-4000:]
