"""Handler names, their typing, and registration by decorator.

What an event handler may look like (plain or async; ``(event, ctx)`` or ``(event)``), how
names and milter-manager's aliases map to events, and :class:`Registration`, whose typed
``on()`` overloads let mypy catch a handler whose event type does not match its name.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final, Literal, TypeAlias, TypeVar, get_args, overload

from milterapp.context import Context
from milterapp.errors import SetupError
from milterapp.events import (
    Abort,
    Body,
    Connect,
    ConnectionClosed,
    ConnectionOpened,
    Data,
    EndOfHeaders,
    EndOfMessage,
    EnvFrom,
    EnvRcpt,
    Event,
    EventName,
    Header,
    Helo,
    Negotiate,
    Quit,
    QuitNoClose,
    Unknown,
)
from milterapp.protocol.constants import MacroStage
from milterapp.replies import (
    Accept,
    Continue,
    Discard,
    Reject,
    Shutdown,
    Skip,
    TempFail,
    Verdict,
)

__all__ = [
    "ALIASES",
    "EVENT_NAMES",
    "CloseEvent",
    "Handler",
    "HandlerName",
    "HandlerSpec",
    "Registration",
    "canonical_name",
    "handler_label",
    "is_async",
    "positional_arity",
]

#: Canonical handler names, in the order events arrive (see :data:`milterapp.events.EventName`).
EVENT_NAMES: Final[tuple[str, ...]] = get_args(EventName)
#: milter-manager's signal names (and a few spellings people type) for the same events.
ALIASES: Final = {
    "connection-established": "open",
    "envelope-from": "envfrom",
    "envelope-recipient": "envrcpt",
    "end-of-header": "eoh",
    "end-of-headers": "eoh",
    "end-of-message": "eom",
    "finished": "close",
}
HandlerName: TypeAlias = str
MacroStageName: TypeAlias = Literal["connect", "helo", "envfrom", "envrcpt", "data", "eoh", "eom"]
CloseEvent: TypeAlias = Quit | QuitNoClose | ConnectionClosed

_OBSERVERS: Final = frozenset({"negotiate", "open", "abort", "close"})
_CONNECTION_REPLIES: Final = (Continue, Accept, Reject, TempFail, Shutdown)
_MESSAGE_REPLIES: Final = (*_CONNECTION_REPLIES, Discard)
_VALID_REPLIES: Final[dict[str, tuple[type, ...]]] = {
    "connect": _CONNECTION_REPLIES,
    "helo": _CONNECTION_REPLIES,
    "unknown": _CONNECTION_REPLIES,
    "body": (*_MESSAGE_REPLIES, Skip),
    **{name: _MESSAGE_REPLIES for name in ("envfrom", "envrcpt", "data", "header", "eoh", "eom")},
}
_STAGES: Final[dict[str, MacroStage]] = {
    "connect": MacroStage.CONNECT,
    "helo": MacroStage.HELO,
    "envfrom": MacroStage.ENVFROM,
    "envrcpt": MacroStage.ENVRCPT,
    "data": MacroStage.DATA,
    "eoh": MacroStage.EOH,
    "eom": MacroStage.EOM,
}

Result: TypeAlias = Verdict | Shutdown | None
MaybeAwaitable: TypeAlias = Result | Awaitable[Result]
E = TypeVar("E", bound=Event)
#: A handler of events of type E: ``(event, ctx)`` or ``(event)``, plain or async.
Handler: TypeAlias = Callable[[E, Context], MaybeAwaitable] | Callable[[E], MaybeAwaitable]

NegotiateH = TypeVar("NegotiateH", bound=Handler[Negotiate])
OpenH = TypeVar("OpenH", bound=Handler[ConnectionOpened])
ConnectH = TypeVar("ConnectH", bound=Handler[Connect])
HeloH = TypeVar("HeloH", bound=Handler[Helo])
EnvFromH = TypeVar("EnvFromH", bound=Handler[EnvFrom])
EnvRcptH = TypeVar("EnvRcptH", bound=Handler[EnvRcpt])
DataH = TypeVar("DataH", bound=Handler[Data])
UnknownH = TypeVar("UnknownH", bound=Handler[Unknown])
HeaderH = TypeVar("HeaderH", bound=Handler[Header])
EohH = TypeVar("EohH", bound=Handler[EndOfHeaders])
BodyH = TypeVar("BodyH", bound=Handler[Body])
EomH = TypeVar("EomH", bound=Handler[EndOfMessage])
AbortH = TypeVar("AbortH", bound=Handler[Abort])
CloseH = TypeVar(
    "CloseH",
    bound=Callable[[CloseEvent, Context], MaybeAwaitable] | Callable[[CloseEvent], MaybeAwaitable],
)
AnyH = TypeVar("AnyH", bound=Callable[..., Any])
Hook = TypeVar("Hook", bound=Callable[[], Awaitable[None] | None])
ErrorMapper = TypeVar("ErrorMapper", bound=Callable[..., Any])


@dataclass(frozen=True, slots=True)
class HandlerSpec:
    fn: Callable[..., Any]
    name: str
    is_async: bool
    takes_ctx: bool
    timeout: float | None


def canonical_name(name: str) -> str:
    canonical = ALIASES.get(name, name)
    if canonical not in EVENT_NAMES:
        valid = ", ".join((*EVENT_NAMES, *ALIASES))
        raise SetupError(f"unknown event name {name!r}; valid names: {valid}")
    return canonical


def is_async(fn: Callable[..., Any]) -> bool:
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004 - a callable object with async __call__
    )


def positional_arity(fn: Callable[..., Any], name: str, allowed: Iterable[int]) -> int:
    """Return how many positional arguments to pass ``fn``: the largest allowed that fits."""
    try:
        parameters = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError) as exc:
        raise SetupError(f"cannot inspect the signature of handler {name}: {exc}") from exc
    expected = " or ".join(f"{n} argument{'s' * (n != 1)}" for n in allowed)
    keyword_only = [p.name for p in parameters if p.kind is p.KEYWORD_ONLY and p.default is p.empty]
    if keyword_only:
        raise SetupError(
            f"handler {name} has required keyword-only parameters {keyword_only}; "
            f"it must take {expected} (event, ctx)"
        )
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = sum(p.default is p.empty for p in positional)
    variadic = any(p.kind is p.VAR_POSITIONAL for p in parameters)
    for count in sorted(allowed, reverse=True):
        if required <= count and (variadic or count <= len(positional)):
            return count
    raise SetupError(f"handler {name} must take {expected} (event, ctx), not {len(positional)}")


def handler_label(fn: Callable[..., Any]) -> str:
    """A stable name for logs: the function's qualified name, or a callable's class name."""
    name = getattr(fn, "__qualname__", None)
    return name if isinstance(name, str) else type(fn).__qualname__


class Registration:
    """The ``on()`` decorator, with one typed overload per event name.

    Mixed into :class:`milterapp.app.App`, which provides :meth:`add_handler`.
    """

    def add_handler(
        self, name: str, handler: Callable[..., Any], *, timeout: float | None = None
    ) -> None:
        raise NotImplementedError  # pragma: no cover - App defines it

    @overload
    def on(
        self, name: Literal["negotiate"], *, timeout: float | None = None
    ) -> Callable[[NegotiateH], NegotiateH]: ...
    @overload
    def on(
        self, name: Literal["open", "connection-established"], *, timeout: float | None = None
    ) -> Callable[[OpenH], OpenH]: ...
    @overload
    def on(
        self, name: Literal["connect"], *, timeout: float | None = None
    ) -> Callable[[ConnectH], ConnectH]: ...
    @overload
    def on(
        self, name: Literal["helo"], *, timeout: float | None = None
    ) -> Callable[[HeloH], HeloH]: ...
    @overload
    def on(
        self, name: Literal["envfrom", "envelope-from"], *, timeout: float | None = None
    ) -> Callable[[EnvFromH], EnvFromH]: ...
    @overload
    def on(
        self, name: Literal["envrcpt", "envelope-recipient"], *, timeout: float | None = None
    ) -> Callable[[EnvRcptH], EnvRcptH]: ...
    @overload
    def on(
        self, name: Literal["data"], *, timeout: float | None = None
    ) -> Callable[[DataH], DataH]: ...
    @overload
    def on(
        self, name: Literal["unknown"], *, timeout: float | None = None
    ) -> Callable[[UnknownH], UnknownH]: ...
    @overload
    def on(
        self, name: Literal["header"], *, timeout: float | None = None
    ) -> Callable[[HeaderH], HeaderH]: ...
    @overload
    def on(
        self,
        name: Literal["eoh", "end-of-header", "end-of-headers"],
        *,
        timeout: float | None = None,
    ) -> Callable[[EohH], EohH]: ...
    @overload
    def on(
        self, name: Literal["body"], *, timeout: float | None = None
    ) -> Callable[[BodyH], BodyH]: ...
    @overload
    def on(
        self, name: Literal["eom", "end-of-message"], *, timeout: float | None = None
    ) -> Callable[[EomH], EomH]: ...
    @overload
    def on(
        self, name: Literal["abort"], *, timeout: float | None = None
    ) -> Callable[[AbortH], AbortH]: ...
    @overload
    def on(
        self, name: Literal["close", "finished"], *, timeout: float | None = None
    ) -> Callable[[CloseH], CloseH]: ...
    @overload
    def on(self, name: str, *, timeout: float | None = None) -> Callable[[AnyH], AnyH]: ...
    def on(self, name: str, *, timeout: float | None = None) -> Callable[[AnyH], AnyH]:
        """Register the decorated function for event ``name``; it is returned unchanged.

        Names: negotiate, open, connect, helo, envfrom, envrcpt, data, unknown, header, eoh,
        body, eom, abort, close, and milter-manager's aliases (connection-established,
        envelope-from, envelope-recipient, end-of-header, end-of-message, finished).
        """
        canonical_name(name)  # fail at decoration time, before the function is even defined

        def register(handler: AnyH) -> AnyH:
            self.add_handler(name, handler, timeout=timeout)
            return handler

        return register
