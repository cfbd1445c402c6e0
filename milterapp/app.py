"""The App: handler registry, dispatch with fail-closed error handling, negotiation needs.

Handlers are registered with ``@app.on(name)`` (or :meth:`App.add_handler`); the decorator
returns the function unchanged. Dispatch runs an event's handlers in registration order and
combines their replies with :func:`milterapp.replies.decide`. A handler that raises, times out
or returns something that is not a valid reply gives the app's fallback reply (TempFail by
default), so no message is accepted because our code failed.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable, Coroutine
from typing import Any, Final

from pydantic import BaseModel, ConfigDict, Field, field_validator

from milterapp.context import DEFAULT_SPOOL_THRESHOLD, Context
from milterapp.errors import SetupError
from milterapp.events import (
    Event,
)
from milterapp.handlers import (
    ALIASES,
    EVENT_NAMES,
    CloseEvent,
    ErrorMapper,
    HandlerName,
    HandlerSpec,
    Hook,
    MacroStageName,
    Registration,
    Result,
    canonical_name,
    handler_label,
    is_async,
    positional_arity,
)
from milterapp.protocol.constants import ActionFlag, MacroStage
from milterapp.protocol.negotiation import OPTIONAL_EVENTS, OptionalEvent, Requirements
from milterapp.replies import (
    RESTRICTIVE,
    Accept,
    Continue,
    Discard,
    NegotiationReply,
    Reject,
    Shutdown,
    Skip,
    TempFail,
    Verdict,
    decide,
)

__all__ = [
    "ALIASES",
    "EVENT_NAMES",
    "App",
    "AppConfig",
    "CloseEvent",
    "HandlerName",
    "Pending",
]

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
_STAGES: Final[dict[str, MacroStage]] = {
    "connect": MacroStage.CONNECT,
    "helo": MacroStage.HELO,
    "envfrom": MacroStage.ENVFROM,
    "envrcpt": MacroStage.ENVRCPT,
    "data": MacroStage.DATA,
    "eoh": MacroStage.EOH,
    "eom": MacroStage.EOM,
}


class Pending:
    """The rest of a dispatch, to be awaited: see :meth:`App.dispatch_now`."""

    __slots__ = ("awaitable",)

    def __init__(self, awaitable: Coroutine[Any, Any, Verdict | Shutdown | None]) -> None:
        self.awaitable = awaitable


class AppConfig(BaseModel):
    """Every option of an App, validated when the App is created.

    Attributes:
        fallback: the reply when a handler fails (raises, times out, returns a non-reply).
            TempFail by default: the MTA retries later and no mail passes unchecked.
        handler_timeout: seconds an async handler may run (None: no limit). Keep it below
            the MTA's timeouts (Postfix milter_command_timeout 30 s, Sendmail T=R:10s).
        progress_interval: seconds between progress packets while an end-of-message handler
            runs (Postfix milter_content_timeout is 300 s; Sendmail's T=E is 5 min in all).
        actions: the actions the app needs; None asks for all the MTA offers and requires
            none. When given, negotiation fails if the MTA lacks one of them.
        macros: macro names to ask for, per stage name (``{"envfrom": ["{auth_authen}"]}``).
        no_reply: handled events whose handlers never change the verdict.
        leading_space: header values with their leading whitespace (HDR_LEADSPC).
        rejected_recipients: also see recipients the MTA rejected (RCPT_REJ).
        keep_message: keep sender, recipients, headers and body for end of message.
        spool_threshold: kept bodies above this many bytes go to a temporary file.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    fallback: TempFail | Reject | Discard | Accept | Continue = TempFail()
    handler_timeout: float | None = Field(default=25.0, gt=0)
    progress_interval: float = Field(default=10.0, gt=0)
    actions: ActionFlag | None = None
    macros: dict[MacroStageName, tuple[str, ...]] = Field(default_factory=dict)
    no_reply: frozenset[OptionalEvent] = frozenset()
    leading_space: bool = False
    rejected_recipients: bool = False
    keep_message: bool = False
    spool_threshold: int = Field(default=DEFAULT_SPOOL_THRESHOLD, ge=0)

    @field_validator("macros")
    @classmethod
    def _check_macros(
        cls, value: dict[MacroStageName, tuple[str, ...]]
    ) -> dict[MacroStageName, tuple[str, ...]]:
        NegotiationReply(macros={_STAGES[stage]: names for stage, names in value.items()})
        return value


class App(Registration):
    """A milter application: handlers per event, options, and what to ask the MTA for.

    Args:
        name: the milter's name (logs, the demo header, ``ctx.app_name``).
        **options: any field of :class:`AppConfig`.
    """

    def __init__(self, name: str, **options: Any) -> None:
        self.name = name
        self.config = AppConfig(**options)
        self._handlers: dict[str, list[HandlerSpec]] = {}
        self._error_mappers: dict[type[BaseException], Callable[..., Any]] = {}
        self._startup: list[Callable[[], Any]] = []
        self._shutdown: list[Callable[[], Any]] = []
        self._started = False
        # Set by the server while it runs: a thread-safe "please stop" callable.
        self._stop: Callable[[], None] | None = None

    def __repr__(self) -> str:
        return f"<App {self.name!r}>"

    # --- registration --------------------------------------------------------------------

    def _check_not_started(self, what: str) -> None:
        if self._started:
            raise SetupError(
                f"cannot {what} on {self.name!r}: the app is already serving; "
                "register everything before app.run() or app.serve()"
            )

    def add_handler(
        self, name: str, handler: Callable[..., Any], *, timeout: float | None = None
    ) -> None:
        """Register ``handler`` for event ``name`` (or an alias); the plain form of :meth:`on`.

        Args:
            timeout: this handler's deadline in seconds, instead of the app's default.

        Raises:
            SetupError: unknown event name, a handler that takes neither ``(event)`` nor
                ``(event, ctx)``, or the app is already serving.
        """
        canonical = canonical_name(name)
        self._check_not_started(f"add a {canonical!r} handler")
        if not callable(handler):
            raise SetupError(f"handler for {canonical!r} must be callable, not {handler!r}")
        label = handler_label(handler)
        arity = positional_arity(handler, label, (1, 2))
        if timeout is not None and timeout <= 0:
            raise SetupError(f"timeout of handler {label} must be positive, not {timeout}")
        entry = HandlerSpec(
            fn=handler,
            name=label,
            is_async=is_async(handler),
            takes_ctx=arity == 2,
            timeout=timeout if timeout is not None else self.config.handler_timeout,
        )
        self._handlers.setdefault(canonical, []).append(entry)

    def on_error(self, exc_type: type[BaseException]) -> Callable[[ErrorMapper], ErrorMapper]:
        """Map exceptions of ``exc_type`` (and subclasses) raised by handlers to a reply.

        The decorated function takes ``(exc, ctx)`` and returns a reply, or None for the
        app's fallback. The most specific registered class wins.
        """
        if not (isinstance(exc_type, type) and issubclass(exc_type, BaseException)):
            raise SetupError(f"on_error needs an exception class, not {exc_type!r}")

        def register(mapper: ErrorMapper) -> ErrorMapper:
            self._check_not_started("add an error mapper")
            positional_arity(mapper, handler_label(mapper), (2,))
            self._error_mappers[exc_type] = mapper
            return mapper

        return register

    def on_startup(self, hook: Hook) -> Hook:
        """Run ``hook()`` (plain or async) before the server accepts connections."""
        self._check_not_started("add a startup hook")
        self._startup.append(hook)
        return hook

    def on_shutdown(self, hook: Hook) -> Hook:
        """Run ``hook()`` (plain or async) after the server has stopped."""
        self._check_not_started("add a shutdown hook")
        self._shutdown.append(hook)
        return hook

    def handles(self, name: str) -> bool:
        """Whether any handler is registered for event ``name``."""
        return bool(self._handlers.get(canonical_name(name)))

    # --- negotiation ---------------------------------------------------------------------

    def requirements(self) -> Requirements:
        """What to ask the MTA for, derived from the handlers and the options."""
        config = self.config
        handled = {name for name in self._handlers if name in OPTIONAL_EVENTS}
        kept = {"envfrom", "envrcpt", "header", "body"} if config.keep_message else set()
        events = handled | kept
        no_reply = (set(config.no_reply) & handled) | (kept - handled)
        return Requirements(
            events=frozenset(events),  # type: ignore[arg-type]
            no_reply=frozenset(no_reply),  # type: ignore[arg-type]
            actions=ActionFlag.ALL & ~ActionFlag.SETSYMLIST
            if config.actions is None
            else config.actions,
            required_actions=config.actions or ActionFlag.NONE,
            macros={_STAGES[stage]: names for stage, names in config.macros.items()},
            leading_space=config.leading_space,
            rejected_recipients=config.rejected_recipients,
            # Skipping the body would cut what keep_message collects for end of message.
            skip="body" in handled and not config.keep_message,
        )

    # --- lifecycle -----------------------------------------------------------------------

    async def run_startup(self) -> None:
        """Run the startup hooks in order; registration is closed from now on."""
        self._started = True
        for hook in self._startup:
            result = hook()
            if inspect.isawaitable(result):
                await result

    async def run_shutdown(self) -> None:
        """Run the shutdown hooks in reverse order (every one, even if one fails)."""
        errors: list[BaseException] = []
        for hook in reversed(self._shutdown):
            try:
                result = hook()
                if inspect.isawaitable(result):
                    await result
            except Exception as exc:  # noqa: BLE001 - run the others, then re-raise
                errors.append(exc)
        if errors:
            raise errors[0]

    # --- dispatch ------------------------------------------------------------------------

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
        results: list[Result] = []
        opinions = False  # a handler returned something other than None
        for index, handler in enumerate(handlers):
            if handler.is_async:
                return Pending(self._dispatch_from(name, event, ctx, handlers, index, results))
            try:
                result = handler.fn(event, ctx) if handler.takes_ctx else handler.fn(event)
                if result is not None:
                    if inspect.isawaitable(result):  # a plain function that returned a coroutine
                        return Pending(
                            self._dispatch_from(name, event, ctx, handlers, index, results, result)
                        )
                    result = self._check_result(handler, name, result)
                    opinions = True
            except Exception as exc:  # noqa: BLE001 - handled (fail closed) by _dispatch_from
                return Pending(self._dispatch_from(name, event, ctx, handlers, index, results, exc))
            results.append(result)
            if isinstance(result, RESTRICTIVE):
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

    # --- running -------------------------------------------------------------------------

    def run(self, spec: str | None = None, **options: Any) -> None:
        """Serve until SIGTERM or SIGINT (for scripts); options: ``ServerOptions``.

        ``spec`` defaults to ``--spec`` on the command line, then ``$MILTERAPP_SPEC``, then
        the loopback default.
        """
        from milterapp.server import run  # deferred: the server layer sits above the app

        run(self, spec, **options)

    async def serve(self, spec: str | None = None, **options: Any) -> None:
        """Serve inside a running event loop until :meth:`shutdown` is called."""
        from milterapp.server import serve  # deferred: the server layer sits above the app

        await serve(self, spec, **options)

    def shutdown(self) -> None:
        """Ask the running server to shut down gracefully; safe from any thread or signal.

        Does nothing when the app is not serving.
        """
        stop = self._stop
        if stop is not None:
            stop()
