"""``key=value`` log lines, as structlog's own processors write them, at a fraction of the cost.

A line per message is the administrator's default (``--log-level INFO``), so a line's cost
is part of every message's. structlog's generic path (the level method, the processor chain
over a fresh copy of the bound context, ``LogfmtRenderer``'s check of every character of
every key, ``TimeStamper``) took more than the rest of the message's bookkeeping together.

- :class:`UtcTimestamp` and :func:`render_logfmt` are processors that give exactly what
  ``TimeStamper(fmt="iso", utc=True)`` and ``LogfmtRenderer`` give (tests compare them).
- :func:`logfmt_logger_class` makes the bound logger class of ``configure_logging``'s text
  lines: its level methods write the line those processors would give, with the bound
  context rendered once per logger instead of once per line. Whatever it does not cover (an
  exception to format, positional arguments, a key given twice, structlog configured anew)
  goes the processors' way.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, MutableMapping
from typing import Any, Final

import structlog
from structlog.contextvars import get_contextvars

__all__ = ["UtcTimestamp", "logfmt_logger_class", "render_logfmt"]

#: The keys every line starts with, in this order.
_FIRST: Final = ("timestamp", "level", "event")
_FIRST_KEYS: Final = frozenset(_FIRST)
#: Fields that take the processors' way: moved first, or an exception to format.
_RESERVED: Final = frozenset({*_FIRST, "exc_info"})
#: structlog's level methods, by number (``add_log_level`` writes these names unchanged).
_LEVELS: Final = {10: "debug", 20: "info", 30: "warning", 40: "error", 50: "critical"}
#: Keys found valid (no space or control character), so each is examined once.
_checked_keys: set[str] = set()


class UtcTimestamp:
    """``timestamp`` as structlog's ``TimeStamper(fmt="iso", utc=True)`` writes it
    (``2026-12-06T10:41:07.118734Z``), for a quarter of its cost: the date and time are
    formatted once a second, the microseconds each line (always six digits)."""

    def __init__(self) -> None:
        self._second = -1
        self._text = ""

    def __call__(self, logger: Any, method: str, event: MutableMapping[str, Any]) -> Any:
        event["timestamp"] = self.now()
        return event

    def now(self) -> str:
        """The time now, as the ``timestamp`` field gives it."""
        micros = time.time_ns() // 1000
        second = micros // 1_000_000
        if second != self._second:
            self._text = time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(second))
            self._second = second
        # (Six digits: one more leading digit, cut off, costs less than a format spec.)
        return f"{self._text}{str(micros % 1_000_000 + 1_000_000)[1:]}Z"


def render_logfmt(logger: Any, method: str, event: MutableMapping[str, Any]) -> str:
    """``key=value`` text as structlog's ``LogfmtRenderer`` writes it (``timestamp``,
    ``level`` and ``event`` first; values quoted when they hold a space, ``=`` or ``"``; a
    true boolean as the bare key), at a quarter of its cost: that renderer examined every
    character of every key of every line."""
    elements: list[str] = []
    items = [(key, event.pop(key)) for key in _FIRST if key in event]
    items += event.items()
    render_pairs(items, elements)
    return " ".join(elements)


def render_pairs(items: Iterable[tuple[str, Any]], elements: list[str]) -> None:
    """Append ``key=value`` for each pair to ``elements``, as :func:`render_logfmt` does.

    Raises:
        ValueError: a key holds a space or a control character (as structlog's does).
    """
    add = elements.append
    checked = _checked_keys
    for key, value in items:
        if key not in checked:
            if any(c <= " " for c in key):
                raise ValueError(f'Invalid key: "{key}"')
            checked.add(key)
        kind = type(value)
        if kind is str:
            pass
        elif kind is int or kind is float:
            add(f"{key}={value}")
            continue
        elif value is None:
            add(f"{key}=")
            continue
        elif kind is bool:
            if value:
                add(key)
                continue
            value = "false"
        else:
            value = str(value)
        if " " not in value and "=" not in value and '"' not in value:  # (a regex costs more)
            if "\n" in value:
                value = value.replace("\n", "\\n")
            add(f"{key}={value}")
            continue
        if "\\" in value:
            value = value.replace("\\", "\\\\")
        value = value.replace('"', '\\"').replace("\n", "\\n")
        add(f'{key}="{value}"')


#: ``level=... event=...`` by level and event, for the events seen first (a server logs a
#: few dozen kinds; an app that logs an unbounded variety does not grow this).
_heads: dict[tuple[str, str], str] = {}
_HEADS_KEPT: Final = 256


def _head(level: str, event: str) -> str:
    elements = [f"level={level}"]
    render_pairs((("event", event),), elements)
    head = " ".join(elements)
    if len(_heads) < _HEADS_KEPT:
        _heads[level, event] = head
    return head


def _render_context(context: dict[str, Any]) -> str | None:
    """The bound context as a line gives it, or None if a key of it would move first."""
    if not _FIRST_KEYS.isdisjoint(context):
        return None
    elements: list[str] = []
    render_pairs(context.items(), elements)
    return " ".join(elements)


class _LogfmtLines:
    """The line-writing part of :func:`logfmt_logger_class`'s classes."""

    _context: dict[str, Any]
    _processors: Any
    _logger: Any
    #: The processor list these lines stand for, and its time stamper (set per class).
    _pipeline: Any = None
    _stamp: UtcTimestamp | None = None
    #: The bound context's size, its rendering, and the keys a line's fields must not
    #: have (structlog replaces a context on ``bind()``; only ``new()`` changes one in
    #: place, and it empties it first).
    _prefix: tuple[int, str | None, frozenset[str]] = (-1, None, frozenset())

    def _line(self, level: str, event: str, fields: dict[str, Any]) -> str | None:
        """The line the processors would give for ``event`` and ``fields`` (None: let
        them give it)."""
        context = self._context
        if self._processors is not self._pipeline:
            return None
        size, prefix, reserved = self._prefix
        if size != len(context):
            prefix = _render_context(context)
            reserved = _RESERVED.union(context)
            self._prefix = (len(context), prefix, reserved)
        if prefix is None or (fields and not reserved.isdisjoint(fields)):
            return None  # a key the processors would move or merge, or an exception
        head = _heads.get((level, event)) or _head(level, event)
        stamp = self._stamp
        elements = [f"timestamp={stamp.now()} {head}" if stamp is not None else head]
        if prefix:
            elements.append(prefix)
        if fields:
            render_pairs(fields.items(), elements)
        bound = get_contextvars()
        if bound:  # (merge_contextvars adds only keys the line does not have)
            render_pairs(
                [
                    (key, value)
                    for key, value in bound.items()
                    if key not in context and key not in fields and key not in _FIRST_KEYS
                ],
                elements,
            )
        return " ".join(elements)


def _level_method(name: str, generic: Callable[..., Any]) -> Callable[..., Any]:
    def method(self: Any, event: Any, *args: Any, **fields: Any) -> Any:
        if args or event.__class__ is not str:
            return generic(self, event, *args, **fields)
        line = self._line(name, event, fields)
        if line is None:
            return generic(self, event, **fields)
        return getattr(self._logger, name)(line)

    method.__name__ = name
    return method


def logfmt_logger_class(level: int, processors: list[Any], stamp: UtcTimestamp | None) -> type[Any]:
    """structlog's filtering bound logger class for ``level``, whose methods from ``level``
    up write the lines ``processors`` (ending in :func:`render_logfmt`, with ``stamp``
    among them if lines carry a time) would write."""
    base: type[Any] = structlog.make_filtering_bound_logger(level)
    methods: dict[str, Any] = {"_pipeline": processors, "_stamp": stamp}
    for number, name in _LEVELS.items():
        if number >= level:
            methods[name] = _level_method(name, getattr(base, name))
    for alias, name in (("msg", "info"), ("warn", "warning"), ("fatal", "critical")):
        if name in methods:
            methods[alias] = methods[name]
    return type(base.__name__, (_LogfmtLines, base), methods)
