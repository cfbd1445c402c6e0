"""The App: handler registry, options, and what to negotiate with the MTA.

Handlers are registered with ``@app.on(name)`` (or :meth:`App.add_handler`); the decorator
returns the function unchanged. Running them is :mod:`milterapp.dispatch` (a mixin of App): in
registration order, replies combined with :func:`milterapp.replies.decide`, and a handler that
raises, times out or returns something that is not a valid reply gives the app's fallback
reply (TempFail by default), so no message is accepted because our code failed.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, Final

from pydantic import BaseModel, ConfigDict, Field, field_validator

from milterapp.context import DEFAULT_SPOOL_THRESHOLD
from milterapp.dispatch import Dispatch, Pending
from milterapp.errors import SetupError
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
    canonical_name,
    handler_label,
    is_async,
    positional_arity,
)
from milterapp.protocol.constants import ActionFlag, MacroStage
from milterapp.protocol.negotiation import OPTIONAL_EVENTS, OptionalEvent, Requirements
from milterapp.replies import (
    Accept,
    Continue,
    Discard,
    NegotiationReply,
    Reject,
    TempFail,
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

_STAGES: Final[dict[str, MacroStage]] = {
    "connect": MacroStage.CONNECT,
    "helo": MacroStage.HELO,
    "envfrom": MacroStage.ENVFROM,
    "envrcpt": MacroStage.ENVRCPT,
    "data": MacroStage.DATA,
    "eoh": MacroStage.EOH,
    "eom": MacroStage.EOM,
}


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


class App(Dispatch, Registration):
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
