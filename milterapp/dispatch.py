"""Running an App's handlers: dispatch, combining replies, failing closed.

:class:`Dispatch` is a mixin of :class:`~milterapp.app.App`: it runs the handlers registered
for an event in order, combines their replies with :func:`milterapp.replies.decide`, and turns
every handler failure (an exception, a deadline, a reply that is not valid at that stage) into
the app's fallback reply. Plain handlers run without a coroutine (:meth:`Dispatch.dispatch_now`).
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, Final

from milterapp.context import Context
from milterapp.events import Event
from milterapp.handlers import HandlerSpec, Result
from milterapp.replies import (
    RESTRICTIVE,
    Accept,
    Continue,
    Discard,
    Reject,
    Shutdown,
    Skip,
    TempFail,
    Verdict,
    decide,
)

if TYPE_CHECKING:
    from milterapp.app import AppConfig

__all__ = ["Dispatch", "Pending"]

_OBSERVERS: Final = frozenset({"negotiate", "open", "abort", "close"})
_CONTINUE: Final = Continue()  # what handlers that all returned None give
_CONNECTION_REPLIES: Final = (Continue, Accept, Reject, TempFail, Shutdown)
_MESSAGE_REPLIES: Final = (*_CONNECTION_REPLIES, Discard)
_VALID_REPLIES: Final[dict[str, tuple[type, ...]]] = {
    "connect": _CONNECTION_REPLIES,
    "helo": _CONNECTION_REPLIES,
    "unknown": _CONNECTION_REPLIES,
    "body": (*_MESSAGE_REPLIES, Skip),
    **{name: _MESSAGE_REPLIES for name in ("envfrom", "envrcpt", "data", "header", "eoh", "eom")},
}


class Pending:
    """The rest of a dispatch, to be awaited: see :meth:`App.dispatch_now`."""

    __slots__ = ("awaitable",)

    def __init__(self, awaitable: Coroutine[Any, Any, Verdict | Shutdown | None]) -> None:
        self.awaitable = awaitable


class Dispatch:
    """The dispatch half of :class:`~milterapp.app.App` (see the module docstring)."""

    config: AppConfig
    _handlers: dict[str, list[HandlerSpec]]
    _error_mappers: dict[type[BaseException], Callable[..., Any]]

    async def dispatch(self, name: str, event: Event, ctx: Context) -> Verdict | Shutdown | None:
        """Run the handlers of event ``name`` and combine their replies.

        Returns None when no handler is registered (the server then answers Continue).
        Observers (negotiate, open, abort, close) always give None.
        """
        result = self.dispatch_now(name, event, ctx)
        if isinstance(result, Pending):
            return await result.awaitable
        return result

    def dispatch_now(
        self, name: str, event: Event, ctx: Context
    ) -> Verdict | Shutdown | Pending | None:
        """As :meth:`dispatch`, but without a coroutine while every handler is plain.

        Plain handlers run at once and their combined reply is returned. From the first
        handler that is async, returns an awaitable, raises or gives an invalid reply, the
        rest of the work is returned as a :class:`Pending` to await: the connection handler
        serves most commands of a plain-function app without creating a coroutine.
        """
        handlers = self._handlers.get(name)
        if not handlers:
            return None
        results: list[Result] = []  # one per handler run: len(results) is the next index
        opinions = False  # a handler returned something other than None
        for handler in handlers:
            if handler.is_async:
                return Pending(
                    self._dispatch_from(name, event, ctx, handlers, len(results), results)
                )
            try:
                result = handler.fn(event, ctx) if handler.takes_ctx else handler.fn(event)
                if result is not None:
                    if inspect.isawaitable(result):  # a plain function that returned a coroutine
                        return Pending(
                            self._dispatch_from(
                                name, event, ctx, handlers, len(results), results, result
                            )
                        )
                    result = self._check_result(handler, name, result)
                    opinions = True
            except Exception as exc:  # noqa: BLE001 - handled (fail closed) by _dispatch_from
                return Pending(
                    self._dispatch_from(name, event, ctx, handlers, len(results), results, exc)
                )
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
        ctx: Context,
        handlers: list[HandlerSpec],
        index: int,
        results: list[Result],
        started: object = None,
    ) -> Verdict | Shutdown | None:
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

    async def _run(self, handler: HandlerSpec, name: str, event: Event, ctx: Context) -> Result:
        args = (event, ctx) if handler.takes_ctx else (event,)
        try:
            result = handler.fn(*args)
        except Exception as exc:  # noqa: BLE001 - every handler failure must fail closed
            return await self._failed(handler, name, exc, ctx)
        return await self._finish(handler, name, result, ctx)

    async def _finish(
        self, handler: HandlerSpec, name: str, result: object, ctx: Context
    ) -> Result:
        """Await what a handler returned if it is awaitable (bounded by its timeout), then
        check the reply."""
        try:
            if inspect.isawaitable(result):
                async with asyncio.timeout(handler.timeout):
                    result = await result
            return self._check_result(handler, name, result)
        except Exception as exc:  # noqa: BLE001 - every handler failure must fail closed
            return await self._failed(handler, name, exc, ctx)

    def _check_result(self, handler: HandlerSpec, name: str, result: object) -> Result:
        if result is None:
            return None
        if name in _OBSERVERS:
            raise TypeError(f"{name!r} handlers observe only; return None, not {result!r}")
        if not isinstance(result, _VALID_REPLIES[name]):
            valid = ", ".join(cls.__name__ for cls in _VALID_REPLIES[name])
            raise TypeError(f"returned {result!r}, which is not a valid {name!r} reply ({valid})")
        return result  # type: ignore[return-value]

    async def _failed(
        self, handler: HandlerSpec, name: str, exc: Exception, ctx: Context
    ) -> Result:
        if ctx.raise_errors:
            raise exc
        reason = "timed out" if isinstance(exc, TimeoutError) else "raised"
        ctx.log.error(
            "handler_failed",
            handler=handler.name,
            stage=name,
            reason=reason,
            timeout=handler.timeout,
            exc_info=exc,
        )
        if name in _OBSERVERS:
            return None
        mapped = await self._map_error(exc, ctx)
        if mapped is not None and isinstance(mapped, _VALID_REPLIES[name]):
            return mapped  # type: ignore[return-value]
        fallback = self.config.fallback
        if not isinstance(fallback, _VALID_REPLIES[name]):
            return TempFail()  # e.g. Discard configured but not possible at connect
        return fallback

    async def _map_error(self, exc: Exception, ctx: Context) -> object:
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
