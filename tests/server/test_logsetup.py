"""Logging set-up: every event is one line on stderr, written at once."""

from __future__ import annotations

import io
import json
import os
import socket
import sys
from pathlib import Path

import pytest
import structlog

from milterapp.server.arguments import parse_command_line
from milterapp.server.logsetup import configure_logging
from milterapp.server.options import RunOptions


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


def test_syslog_lines_go_to_the_mail_facility_tagged_with_the_pid(
    sock_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As Postfix's own lines: ``<22>`` is facility mail (2) at priority info (6)."""
    stream = CountingStream()
    monkeypatch.setattr(sys, "stderr", stream)
    path = str(sock_dir / "log")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as syslog:
        syslog.bind(path)
        syslog.settimeout(5)
        configure_logging("text", "INFO", syslog=path)
        log = structlog.get_logger("milterapp").bind(conn_id="1")
        log.info("message", queue_id="4F2A1C", verdict="reject")
        log.debug("event", stage="eom")  # below the level: not sent
        log.error("handler_failed", handler="stamp")
        first = syslog.recv(4096).decode().rstrip("\0")  # (syslog's framing)
        second = syslog.recv(4096).decode().rstrip("\0")
    assert first.startswith(f"<22>milterapp[{os.getpid()}]: ")
    assert "event=message" in first
    assert "queue_id=4F2A1C" in first
    assert "timestamp=" not in first  # syslog stamps the time
    assert second.startswith("<19>")  # mail, err
    assert stream.writes == []  # nothing on stderr


def test_json_lines_to_syslog(sock_dir: Path) -> None:
    path = str(sock_dir / "log")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as syslog:
        syslog.bind(path)
        syslog.settimeout(5)
        configure_logging("json", "INFO", syslog=path)
        structlog.get_logger("milterapp").warning("limit_exceeded", limit="max_headers")
        line = syslog.recv(4096).decode().rstrip("\0")
    tag, _, body = line.partition(": ")
    assert tag == f"<20>milterapp[{os.getpid()}]"  # mail, warning
    assert json.loads(body) == {
        "event": "limit_exceeded",
        "limit": "max_headers",
        "level": "warning",
    }


def test_the_syslog_flag_alone_means_the_local_syslog() -> None:
    assert parse_command_line(["--syslog"], "test") == {"syslog": "/dev/log"}
    assert parse_command_line(["--syslog", "127.0.0.1:514"], "test") == {"syslog": "127.0.0.1:514"}
    assert RunOptions(syslog=True).syslog == "/dev/log"
