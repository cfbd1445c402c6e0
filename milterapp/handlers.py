"""Handlers: what one may look like, and running an event's handlers (failing closed).

A handler is plain or async and takes ``(event, ctx)`` or ``(event)``; this is inspected once,
at registration (:class:`HandlerSpec`). :class:`Dispatcher` runs the handlers of an event in
registration order, combines their replies with :func:`milterapp.replies.decide`, and turns
every failure (an exception, a deadline, a reply that is not valid at that stage) into the
app's fallback reply, so that no message is accepted because our code failed. Plain handlers
run without a coroutine (:meth:`Dispatcher.dispatch_now`); :class:`milterapp.App` is a
Dispatcher with registration on top.
"""

from __future__ import annotations

import asyncio
import inspect
import types
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass
from typing import Any, Final, TypeAlias, TypeVar

from milterapp.context import Context
from milterapp.errors import SetupError
from milterapp.events import ConnectionClosed, Event, Quit, QuitNoClose
from milterapp.message import Message
from milterapp.protocol.stages import BY_NAME, STAGES
from milterapp.replies import RESTRICTIVE, Continue, TempFail, Verdict, decide
from milterapp.server.servable import Outcome, decided

_C = TypeVar("_C")

try:  # The compiled build's class options (docs/architecture.md, "The compiled build").
    from mypy_extensions import mypyc_attr
except ImportError:  # a run-time dependency of neither build: without it, nothing to say

    def mypyc_attr(*args: Any, **kwargs: Any) -> Callable[[_C], _C]:  # type: ignore[misc]
        return lambda cls: cls


__all__ = [
    "ALIASES",
    "EVENT_NAMES",
    "CloseEvent",
    "Dispatcher",
    "Handler",
    "HandlerSpec",
    "canonical_name",
    "handler_label",
    "is_async",
    "names_read",
    "positional_arity",
    "setup_warnings",
]

#: Canonical handler names, in the order events arrive.
EVENT_NAMES: Final[tuple[str, ...]] = tuple(stage.name for stage in STAGES)
#: Other names for the same events (milter-manager's signal names and common spellings).
ALIASES: Final[dict[str, str]] = {alias: stage.name for stage in STAGES for alias in stage.aliases}
#: The events a ``close`` handler receives.
CloseEvent: TypeAlias = Quit | QuitNoClose | ConnectionClosed

MaybeAwaitable: TypeAlias = Outcome | Awaitable[Outcome]
E = TypeVar("E", bound=Event)
#: A handler of events of type E: ``(event, ctx)`` or ``(event)``, plain or async.
Handler: TypeAlias = (
    Callable[[E, Context[Any, Any]], MaybeAwaitable] | Callable[[E], MaybeAwaitable]
)

_CONTINUE: Final = Continue()  # what handlers that all returned None give
_OBSERVERS: Final = frozenset(stage.name for stage in STAGES if stage.observer)
#: The replies a handler may give, per stage (observers give none).
_VALID_REPLIES: Final[dict[str, tuple[type, ...]]] = {
    stage.name: stage.replies for stage in STAGES if not stage.observer
}
#: Every reply class: a result of one of them is not awaitable, which an identity test of
#: its class settles several times faster than inspect.isawaitable() (an ABC check).
_REPLY_CLASSES: Final = frozenset(cls for replies in _VALID_REPLIES.values() for cls in replies)


@mypyc_attr(native_class=False)  # (compiled, a subclass of a built-in must be a Python class)
class _BadReply(TypeError):
    """A handler returned something that is not a valid reply at its stage."""


@dataclass(frozen=True, slots=True)
class HandlerSpec:
    """A registered handler and how to call it (inspected once, at registration)."""

    fn: Callable[..., Any]
    name: str
    is_async: bool
    takes_ctx: bool
    timeout: float | None


def canonical_name(name: str) -> str:
    """The handler name of ``name`` (itself, or what the alias stands for).

    Raises:
        SetupError: an unknown name; the message lists the valid ones.
    """
    stage = BY_NAME.get(name)
    if stage is None:
        valid = ", ".join((*EVENT_NAMES, *ALIASES))
        raise SetupError(f"unknown event name {name!r}; valid names: {valid}")
    return stage.name


def is_async(fn: Callable[..., Any]) -> bool:
    """Whether calling ``fn`` gives a coroutine (an async function or ``__call__``)."""
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


#: What a handler can call on ctx.message only when the body is kept.
_BODY_READERS: Final = frozenset({"as_email", "body", "body_bytes"})
#: Events before the connect event: ctx.client is not known there.
_BEFORE_CONNECT: Final = frozenset({"negotiate", "open"})


def setup_warnings(handlers: dict[str, list[HandlerSpec]], *, keep_message: bool) -> list[str]:
    """What ``handlers`` appear to read that the app will not have, one line each (read from
    their code, so a hint): see :meth:`milterapp.App.setup_warnings`."""
    headers_kept = keep_message or bool(handlers.get("header"))
    warnings: list[str] = []
    for event, specs in handlers.items():
        for spec in specs:
            names = names_read(spec.fn)
            where = f"handler {spec.name} ({event!r})"
            if not keep_message and "message" in names:
                warnings.extend(
                    f"{where} calls ctx.message.{method}(), but the body is not kept: "
                    "create the App with keep_message=True"
                    for method in sorted(names & _BODY_READERS)
                )
            if not headers_kept and {"message", "headers"} <= names:
                warnings.append(
                    f"{where} reads ctx.message.headers, but the MTA is not asked for "
                    "headers: add a 'header' handler or create the App with "
                    "keep_message=True"
                )
            if event in _BEFORE_CONNECT and "client" in names:
                warnings.append(
                    f"{where} reads ctx.client, which is not known before the connect "
                    "event: read it in a 'connect' handler or later"
                )
    return warnings


def names_read(fn: Callable[..., Any]) -> frozenset[str]:
    """The global and attribute names that ``fn``'s code (nested functions included) uses.

    A hint, not a proof: ``{"message", "as_email"}`` among them means the handler very
    likely calls ``ctx.message.as_email()``. Empty when the code cannot be found.
    """
    target: Any = getattr(fn, "func", fn)  # functools.partial
    target = getattr(target, "__func__", target)  # a bound method
    code = getattr(target, "__code__", None)
    if code is None:
        call = getattr(type(target), "__call__", None)  # noqa: B004 - a callable object's method
        code = getattr(call, "__code__", None)
    if not isinstance(code, types.CodeType):
        return frozenset()
    names: set[str] = set()
    pending = [code]
    while pending:
        current = pending.pop()
        names.update(current.co_names)
        pending.extend(const for const in current.co_consts if isinstance(const, types.CodeType))
    return frozenset(names)


def handler_label(fn: Callable[..., Any]) -> str:
    """A stable name for logs: the function's qualified name, or a callable's class name."""
    name = getattr(fn, "__qualname__", None)
    return name if isinstance(name, str) else type(fn).__qualname__


@mypyc_attr(allow_interpreted_subclasses=True)  # the App, and apps that subclass it
class Dispatcher:
    """Runs the handlers registered for each event and combines their replies.

    Compiled in the compiled build, as the per-packet path is (it runs for every event):
    subclasses (the App) stay Python classes.

    Args:
        fallback: the reply when a handler fails (where it is valid; TempFail elsewhere).
    """

    def __init__(self, fallback: Verdict) -> None:
        self._fallback = fallback
        self._handlers: dict[str, list[HandlerSpec]] = {}
        self._error_mappers: dict[type[BaseException], Callable[..., Any]] = {}

    async def dispatch(self, name: str, event: Event, ctx: Context[Any, Any]) -> Outcome:
        """Run the handlers of event ``name`` and combine their replies.

        Returns None when no handler is registered (the server then answers Continue).
        Observers (negotiate, open, abort, close) always give None.
        """
        result = self.dispatch_now(name, event, ctx)
        return result if decided(result) else await result

    def dispatch_now(
        self, name: str, event: Event, ctx: Context[Any, Any]
    ) -> Outcome | Coroutine[Any, Any, Outcome]:
        """As :meth:`dispatch`, but without a coroutine while every handler is plain.

        Plain handlers run at once and their combined reply is returned. From the first
        handler that is async, returns an awaitable, raises or gives an invalid reply, the
        rest of the work is returned as a coroutine to await: the server serves most
        commands of a plain-function app without creating one.
        """
        handlers = self._handlers.get(name)
        if not handlers:
            return None
        results: list[Outcome] = []  # one per handler run: len(results) is the next index
        opinions = False  # a handler returned something other than None
        for handler in handlers:
            if handler.is_async:
                return self._dispatch_from(name, event, ctx, handlers, len(results), results)
            try:
                result = handler.fn(event, ctx) if handler.takes_ctx else handler.fn(event)
                if result is not None:
                    if result.__class__ not in _REPLY_CLASSES and inspect.isawaitable(result):
                        # a plain function that returned a coroutine
                        return self._dispatch_from(
                            name, event, ctx, handlers, len(results), results, result
                        )
                    result = self._check_result(name, result)
                    opinions = True
            except Exception as exc:  # noqa: BLE001 - handled (fail closed) by _dispatch_from
                return self._dispatch_from(name, event, ctx, handlers, len(results), results, exc)
            results.append(result)
            if opinions and isinstance(result, RESTRICTIVE):
                break
        if name in _OBSERVERS:
            return None
        return decide(results) if opinions else _CONTINUE

    async def _dispatch_from(
        self,
        name: str,
        event: Event,
        ctx: Context[Any, Any],
        handlers: list[HandlerSpec],
        index: int,
        results: list[Outcome],
        started: object = None,
    ) -> Outcome:
        """Go on with handlers from ``index``; ``started`` is what that one already gave:
        an awaitable to finish, or the exception it raised."""
        for position in range(index, len(handlers)):
            handler = handlers[position]
            if position == index and isinstance(started, Exception):
                result = await self._failed(handler, name, started, ctx)
            elif position == index and started is not None:
                result = await self._finish(handler, name, started, ctx)
            else:
                result = await self._run(handler, name, event, ctx)
            results.append(result)
            if isinstance(result, RESTRICTIVE):
                break
        if name in _OBSERVERS:
            return None
        return decide(results)

    async def _run(
        self, handler: HandlerSpec, name: str, event: Event, ctx: Context[Any, Any]
    ) -> Outcome:
        args = (event, ctx) if handler.takes_ctx else (event,)
        try:
            result = handler.fn(*args)
        except Exception as exc:  # noqa: BLE001 - every handler failure must fail closed
            return await self._failed(handler, name, exc, ctx)
        return await self._finish(handler, name, result, ctx)

    async def _finish(
        self, handler: HandlerSpec, name: str, result: object, ctx: Context[Any, Any]
    ) -> Outcome:
        """Await what a handler returned if it is awaitable (bounded by its timeout), then
        check the reply."""
        try:
            if inspect.isawaitable(result):
                async with asyncio.timeout(handler.timeout):
                    result = await result
            return self._check_result(name, result)
        except Exception as exc:  # noqa: BLE001 - every handler failure must fail closed
            return await self._failed(handler, name, exc, ctx)

    def _check_result(self, name: str, result: object) -> Outcome:
        if result is None:
            return None
        if name in _OBSERVERS:
            raise _BadReply(f"{name!r} handlers observe only; return None, not {result!r}")
        if not isinstance(result, _VALID_REPLIES[name]):
            valid = ", ".join(cls.__name__ for cls in _VALID_REPLIES[name])
            raise _BadReply(f"returned {result!r}, which is not a valid {name!r} reply ({valid})")
        return result  # type: ignore[return-value]

    async def _failed(
        self, handler: HandlerSpec, name: str, exc: Exception, ctx: Context[Any, Any]
    ) -> Outcome:
        if isinstance(exc, AttributeError) and isinstance(exc.obj, Message) and exc.name:
            # (Said here rather than by a __getattr__ on Message, which would slow down every
            # attribute read of every message.)
            exc.add_note(
                f"ctx.message.{exc.name} is not set: set it first (ctx.message.{exc.name} = ...),"
                " or declare it on the app's message_state class and use ctx.message.state"
            )
        reason = "timed out" if isinstance(exc, TimeoutError) else "raised"
        if ctx.count_failure is not None:
            kind = "bad_reply" if isinstance(exc, _BadReply) else reason.replace(" ", "_")
            ctx.count_failure(kind)
        ctx.log.error(
            "handler_failed",
            handler=handler.name,
            stage=name,
            reason=reason,
            timeout=handler.timeout,
            exc_info=exc,
        )
        if ctx.raise_errors:
            # Tests see the handler's own exception; the connection that it ends knows by this
            # mark that it was logged as the user's failure, not as one of ours.
            exc.milterapp_handler = handler.name  # type: ignore[attr-defined]
            raise exc
        if name in _OBSERVERS:
            return None
        mapped = await self._map_error(exc, ctx)
        if mapped is not None and isinstance(mapped, _VALID_REPLIES[name]):
            return mapped  # type: ignore[return-value]
        fallback = self._fallback
        if not isinstance(fallback, _VALID_REPLIES[name]):
            return TempFail()  # e.g. Discard configured but not possible at connect
        return fallback

    async def _map_error(self, exc: Exception, ctx: Context[Any, Any]) -> object:
        for cls in type(exc).__mro__:
            mapper = self._error_mappers.get(cls)
            if mapper is None:
                continue
            try:
                result = mapper(exc, ctx)
                if inspect.isawaitable(result):
                    result = await result
            except Exception as error:
                ctx.log.error("error_mapper_failed", mapper=repr(mapper), exc_info=error)
                return None
            return result
        return None
