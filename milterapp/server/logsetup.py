"""Logging set-up for ``app.run()`` and the command line; the library itself never calls it.

milterapp logs through structlog (``ctx.log`` and the server's events). An application that
embeds milterapp configures structlog (or the standard library's logging) as it likes;
scripts that call ``app.run()`` get what an administrator expects: one ``key=value`` line
per event on stderr, or JSON lines, or the local syslog with facility ``mail`` so that the
milter's lines sit in the mail log beside the MTA's (through the standard library's
``SysLogHandler`` and structlog's stdlib logger factory). Worker processes log through the
same set-up; each binds its ``worker`` slot and ``pid`` to every line it writes.
"""

from __future__ import annotations

import logging
import sys
from typing import TYPE_CHECKING, Any, Final, Literal, TypeAlias

import structlog

from milterapp.server.logfmt import UtcTimestamp, logfmt_logger_class, render_logfmt

if TYPE_CHECKING:
    import logging.handlers

__all__ = ["DEFAULT_SYSLOG_ADDRESS", "LogFormat", "LogLevel", "configure_logging"]

LogFormat: TypeAlias = Literal["text", "json"]
LogLevel: TypeAlias = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]
#: Where the local syslog daemon listens on Linux.
DEFAULT_SYSLOG_ADDRESS: Final = "/dev/log"
#: The stdlib logger that carries milterapp's lines to syslog.
_SYSLOG_LOGGER: Final = "milterapp.syslog"


def _stderr_logger(*args: object) -> structlog.WriteLogger:
    # One write per line (message and newline together): worker processes share stderr, and
    # print() writes the newline separately, so two workers' lines could interleave.
    return structlog.WriteLogger(file=sys.stderr)


def syslog_handler(address: str) -> logging.handlers.SysLogHandler:
    """A handler for the syslog at ``address``: a socket path, or ``host:port`` (UDP)."""
    import logging.handlers  # only for --syslog: a server logging to stderr does without it

    host, colon, port = address.rpartition(":")
    where: str | tuple[str, int] = (host, int(port)) if colon and port.isdigit() else address
    handler = logging.handlers.SysLogHandler(
        address=where, facility=logging.handlers.SysLogHandler.LOG_MAIL
    )
    # The tag as syslog shows it, like postfix/smtpd[1234]: the pid of the process (worker).
    handler.setFormatter(logging.Formatter("milterapp[%(process)d]: %(message)s"))
    return handler


def configure_logging(
    log_format: LogFormat = "text",
    level: str | int = "INFO",
    *,
    syslog: str | None = None,
) -> None:
    """Send structlog events, from ``level`` up, as ``key=value`` text or JSON to stderr, or
    to the syslog at address ``syslog`` (facility ``mail``) instead."""
    if isinstance(level, str):
        numeric = logging.getLevelName(level.upper())
        if not isinstance(numeric, int):
            raise ValueError(f"unknown log level {level!r}; use DEBUG, INFO, WARNING or ERROR")
        level = numeric
    processors: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
    ]
    stamp = UtcTimestamp() if syslog is None else None
    if stamp is not None:
        processors.append(stamp)
    processors.append(structlog.processors.format_exc_info)
    processors.append(
        structlog.processors.JSONRenderer() if log_format == "json" else render_logfmt
    )
    factory: Any = _stderr_logger
    if syslog is not None:
        # syslog stamps the time itself; the stdlib logger turns the level into a priority.
        target = logging.getLogger(_SYSLOG_LOGGER)
        for old in target.handlers:
            target.removeHandler(old)
            old.close()
        target.addHandler(syslog_handler(syslog))
        target.setLevel(level)
        target.propagate = False

        def factory(*args: object) -> logging.Logger:
            return target

    wrapper = (
        logfmt_logger_class(level, processors, stamp)
        if log_format == "text"
        else structlog.make_filtering_bound_logger(level)
    )
    structlog.configure(
        processors=processors,
        wrapper_class=wrapper,
        # Resolve sys.stderr when each logger is made, not now: it may be replaced later
        # (test runners capture it), and a closed one would break every later log call.
        logger_factory=factory,
        cache_logger_on_first_use=False,
    )
