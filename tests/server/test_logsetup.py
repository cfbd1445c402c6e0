"""Logging set-up: every event is one line on stderr, written at once."""

from __future__ import annotations

import io
import json
import os
import re
import socket
import sys
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import structlog
from hypothesis import given
from hypothesis import strategies as st

from milterapp.server.arguments import parse_command_line
from milterapp.server.logsetup import UtcTimestamp, configure_logging, render_logfmt
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


values = st.one_of(
    st.text(max_size=12),
    st.integers(),
    st.floats(allow_nan=False),
    st.booleans(),
    st.none(),
    st.lists(st.integers(), max_size=2),
)


@given(
    st.dictionaries(st.from_regex(r"[a-z_]{1,8}", fullmatch=True), values, max_size=6),
    st.sampled_from([{}, {"event": "message"}, {"level": "info", "timestamp": "t"}]),
)
def test_our_logfmt_lines_are_structlogs(fields: dict[str, Any], first: dict[str, Any]) -> None:
    event = {**fields, **first}
    theirs = structlog.processors.LogfmtRenderer(
        key_order=["timestamp", "level", "event"], drop_missing=True
    )(None, "info", dict(event))
    assert render_logfmt(None, "info", dict(event)) == theirs


def test_a_key_with_a_space_is_refused_as_structlog_does() -> None:
    with pytest.raises(ValueError, match='Invalid key: "a b"'):
        render_logfmt(None, "info", {"a b": 1})


def test_the_timestamp_is_structlogs_iso_utc_form() -> None:
    ours = UtcTimestamp()(None, "info", {})["timestamp"]
    theirs = structlog.processors.TimeStamper(fmt="iso", utc=True)(None, "info", {})["timestamp"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", ours)
    assert abs(
        datetime.fromisoformat(ours.replace("Z", "+00:00"))
        - datetime.fromisoformat(theirs.replace("Z", "+00:00"))
    ) < timedelta(seconds=1)
