"""Logging set-up: every event is one line on stderr, written at once."""

from __future__ import annotations

import io
import json
import sys

import pytest
import structlog

from milterapp.server.logsetup import configure_logging


class CountingStream(io.StringIO):
    """A text stream that counts its writes."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return super().write(text)


def test_each_event_is_one_write_of_one_whole_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """Worker processes share stderr: a line written in two parts (as print() writes the
    newline apart) could interleave with another process's line."""
    stream = CountingStream()
    monkeypatch.setattr(sys, "stderr", stream)
    configure_logging("text", "INFO")
    structlog.get_logger("milterapp").info("listening", worker=1)
    structlog.get_logger("milterapp").info("listening", worker=2)
    assert len(stream.writes) == 2
    assert all(text.endswith("\n") and text.count("\n") == 1 for text in stream.writes)
    assert "event=listening" in stream.writes[0]
    assert "worker=2" in stream.writes[1]


def test_json_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    stream = CountingStream()
    monkeypatch.setattr(sys, "stderr", stream)
    configure_logging("json", "WARNING")
    log = structlog.get_logger("milterapp")
    log.info("not shown")
    log.warning("limit_exceeded", limit="max_headers")
    [line] = stream.writes
    entry = json.loads(line)
    assert entry["event"] == "limit_exceeded"
    assert entry["limit"] == "max_headers"
    assert entry["level"] == "warning"
