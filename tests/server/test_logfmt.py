"""key=value lines: the processors give structlog's text, the logger class the processors'."""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from typing import Any

import pytest
import structlog
from hypothesis import given
from hypothesis import strategies as st

from milterapp.server.logfmt import UtcTimestamp, logfmt_logger_class, render_logfmt

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


class FixedTimestamp(UtcTimestamp):
    """A time stamper that always gives the same time, so two lines can be compared."""

    def now(self) -> str:
        return "2026-12-06T10:41:07.000123Z"


class Lines:
    """A wrapped logger that keeps each line with the method that wrote it."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str]] = []

    def __getattr__(self, method: str) -> Any:
        return lambda line: self.lines.append((method, line))


def pipeline(stamp: UtcTimestamp | None) -> list[Any]:
    """The processors of configure_logging's text lines."""
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
    ]
    if stamp is not None:
        processors.append(stamp)
    return [*processors, structlog.processors.format_exc_info, render_logfmt]


def both(
    level: int, context: dict[str, Any], stamp: UtcTimestamp | None = None
) -> tuple[Any, Lines, Any, Lines]:
    """Our logger and structlog's over the same processors, each writing to its own Lines."""
    processors = pipeline(stamp)
    ours, theirs = Lines(), Lines()
    fast = logfmt_logger_class(level, processors, stamp)(ours, processors, dict(context))
    plain = structlog.make_filtering_bound_logger(level)(theirs, processors, dict(context))
    return fast, ours, plain, theirs


keys = st.from_regex(r"[a-z_]{1,8}", fullmatch=True) | st.sampled_from(["event", "level"])


@given(
    context=st.dictionaries(keys, values, max_size=4),
    fields=st.dictionaries(keys.filter(lambda key: key != "event"), values, max_size=5),
    bound=st.dictionaries(keys, values, max_size=2),
    event=st.text(max_size=10),
    method=st.sampled_from(["debug", "info", "msg", "warning", "warn", "error", "critical"]),
    stamped=st.booleans(),
)
def test_the_logger_class_writes_what_the_processors_write(
    context: dict[str, Any],
    fields: dict[str, Any],
    bound: dict[str, Any],
    event: str,
    method: str,
    stamped: bool,
) -> None:
    fast, ours, plain, theirs = both(20, context, FixedTimestamp() if stamped else None)
    with structlog.contextvars.bound_contextvars(**bound):
        for logger in (fast, plain):
            getattr(logger, method)(event, **fields)
            getattr(logger.bind(extra=1), method)(event, **fields)
    assert ours.lines == theirs.lines


def test_the_bound_context_is_rendered_once_per_logger(monkeypatch: pytest.MonkeyPatch) -> None:
    fast, ours, _, _ = both(20, {"conn_id": "7", "client": "mx one"}, FixedTimestamp())
    fast.info("message", queue_id="4F2A1C")
    monkeypatch.setattr("milterapp.server.logfmt._render_context", None)  # (not called again)
    fast.info("message", queue_id="4F2A1D", sender="a b")
    assert [line for _, line in ours.lines] == [
        f"timestamp=2026-12-06T10:41:07.000123Z level=info event=message conn_id=7 "
        f'client="mx one" queue_id={queue_id}{tail}'
        for queue_id, tail in (("4F2A1C", ""), ("4F2A1D", ' sender="a b"'))
    ]


def test_what_the_shortcut_leaves_goes_the_processors_way() -> None:
    fast, ours, plain, theirs = both(20, {"conn_id": "7"}, FixedTimestamp())
    for logger in (fast, plain):
        logger.info("%s of %d", "one", 2, conn_id="8")  # positional arguments, a key twice
        logger.info(42)  # not a string
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            logger.error("handler_failed", exc_info=True)
            logger.exception("handler_failed")
        logger.log(30, "limit_exceeded", limit="max_headers")
        logger.debug("below the level")
    assert ours.lines == theirs.lines
    assert len(ours.lines) == 5
    assert ours.lines[0] == (
        "info",
        'timestamp=2026-12-06T10:41:07.000123Z level=info event="one of 2" conn_id=8',
    )
    assert "Traceback" in ours.lines[2][1]


def test_structlog_configured_anew_takes_its_own_processors() -> None:
    fast, ours, _, _ = both(20, {"conn_id": "7"})
    fast._processors = [lambda logger, method, event: f"custom {event['event']}"]
    fast.info("message")
    assert ours.lines == [("info", "custom message")]
