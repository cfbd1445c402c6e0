"""Logging set-up for ``app.run()`` and the command line; the library itself never calls it.

milterapp logs through structlog (``ctx.log`` and the server's events). An application that
embeds milterapp configures structlog (or the standard library's logging) as it likes;
scripts that call ``app.run()`` get a sensible default: one ``key=value`` line per event on
stderr, or JSON lines.
"""

from __future__ import annotations

import logging
import sys
from typing import Literal, TypeAlias

import structlog

__all__ = ["LogFormat", "LogLevel", "configure_logging"]

LogFormat: TypeAlias = Literal["text", "json"]
LogLevel: TypeAlias = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]


def _stderr_logger(*args: object) -> structlog.WriteLogger:
    # One write per line (message and newline together): worker processes share stderr, and
    # print() writes the newline separately, so two workers' lines could interleave.
    return structlog.WriteLogger(file=sys.stderr)


def configure_logging(log_format: LogFormat = "text", level: str | int = "INFO") -> None:
    """Send structlog events to stderr as ``key=value`` text or JSON, from ``level`` up."""
    if isinstance(level, str):
        numeric = logging.getLevelName(level.upper())
        if not isinstance(numeric, int):
            raise ValueError(f"unknown log level {level!r}; use DEBUG, INFO, WARNING or ERROR")
        level = numeric
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer()
        if log_format == "json"
        else structlog.processors.LogfmtRenderer(key_order=["timestamp", "level", "event"])
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        # Resolve sys.stderr when each logger is made, not now: it may be replaced later
        # (test runners capture it), and a closed one would break every later log call.
        logger_factory=_stderr_logger,
        cache_logger_on_first_use=False,
    )
