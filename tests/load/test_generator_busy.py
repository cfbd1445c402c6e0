"""``milterapp bench`` says when the generator, not the milter, was the limit: its own CPU time
per process, and a note when a process was busy a whole core (docs/cli.md)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from milterapp import App
from milterapp.load import LoadOptions, generator, run_load
from milterapp.load.result import SATURATED
from milterapp.testing import ServerThread
from tests.load.test_generator import spec_of


def burn(seconds: float) -> None:
    """Keep this thread busy for ``seconds`` of its own CPU time."""
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def test_a_generator_throttled_on_purpose_is_reported_as_the_limit(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Every read of an answer costs the generator 5 ms of CPU: it is busy all the time, and
    # the milter waits for it. The milter runs in a process of its own, as it does when
    # measured: in this one, its thread would take the GIL from the generator's now and then.
    received = generator._Client.data_received

    def slow(self: Any, data: bytes) -> None:
        burn(0.005)
        received(self, data)

    monkeypatch.setattr(generator._Client, "data_received", slow)
    (tmp_path / "quick.py").write_text("from milterapp import App\napp = App('quick')\n")
    socket_path = tmp_path / "m.sock"
    process = subprocess.Popen(  # noqa: S603 - our own interpreter and module
        [sys.executable, "-m", "milterapp", "run", "quick:app", "--spec", f"unix:{socket_path}"],
        cwd=tmp_path,
        stderr=subprocess.PIPE,
        text=True,
    )
    with process:
        try:
            assert process.stderr is not None
            assert "listening" in process.stderr.readline()  # blocks until it listens
            options = LoadOptions(spec=f"unix:{socket_path}", connections=2, messages=5)
            result = run_load(options)
        finally:
            process.terminate()
            process.wait(timeout=30)
    assert result.messages == 5
    assert result.generator_saturated, result.generator_busy
    assert min(result.generator_busy) >= SATURATED
    assert "the generator was the limit" in result.report(options)
    assert result.summary()["generator_saturated"] is True


def test_a_slow_milter_leaves_the_generator_idle_and_says_nothing_of_it() -> None:
    app = App("slow")

    @app.on("eoh")
    def ponder(event: Any) -> None:
        time.sleep(0.005)  # the milter's thread, not the generator's

    with ServerThread(app, "inet:0@[127.0.0.1]") as server:
        options = LoadOptions(spec=spec_of(server), connections=1, messages=10)
        result = run_load(options)
    assert result.messages == 10
    assert len(result.generator_busy) == 1
    assert result.generator_busy[0] < 0.5
    assert not result.generator_saturated
    report = result.report(options)
    assert "generator busy" in report
    assert "the generator was the limit" not in report
    assert result.summary()["generator_saturated"] is False
