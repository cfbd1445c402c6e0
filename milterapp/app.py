"""The App: a milter's handlers, options and lifecycle, and running it.

Handlers are registered with ``@app.on(name)`` (or :meth:`App.add_handler`); the decorator
returns the function unchanged. Running them is :class:`~milterapp.handlers.Dispatcher`'s work,
which App extends: in registration order, replies combined with
:func:`milterapp.replies.decide`, and a handler that raises, times out or returns something
that is not a valid reply gives the app's fallback reply (TempFail by default), so no message
is accepted because our code failed. ``app.run()`` hands the app to :mod:`milterapp.server`,
which serves anything shaped like an App (:class:`~milterapp.server.servable.Servable`) and
never imports this module.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any, Literal, TypeVar, overload

import structlog
from pydantic import ValidationError

from milterapp import server
from milterapp.config import AppConfig
from milterapp.constants import ActionFlag
from milterapp.context import KEPT_EVENTS, RECORDED_EVENTS, Context
from milterapp.errors import SetupError
from milterapp.events import (
    Abort,
    Body,
    Connect,
    ConnectionOpened,
    Data,
    EndOfHeaders,
    EndOfMessage,
    EnvFrom,
    EnvRcpt,
    Event,
    Header,
    Helo,
    Negotiate,
    Unknown,
)
from milterapp.handlers import (
    CloseEvent,
    Dispatcher,
    Handler,
    HandlerSpec,
    MaybeAwaitable,
    canonical_name,
    handler_label,
    is_async,
    positional_arity,
    setup_warnings,
)
from milterapp.protocol.negotiation import OPTIONAL_EVENTS, Requirements
from milterapp.protocol.stages import OptionalEvent
from milterapp.replies import NegotiationReply
from milterapp.server.arguments import describe
from milterapp.server.servable import Outcome, Serving

if TYPE_CHECKING:  # the chain is imported by use_milter(): an app without upstreams skips it
    from milterapp.chain.options import FailurePolicy
    from milterapp.chain.party import UpstreamMilter

__all__ = ["App"]

_log = structlog.get_logger("milterapp")

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
    bound=Callable[[CloseEvent, Context[Any, Any]], MaybeAwaitable]
    | Callable[[CloseEvent], MaybeAwaitable],
)
AnyH = TypeVar("AnyH", bound=Callable[..., Any])
Hook = TypeVar("Hook", bound=Callable[[], Awaitable[None] | None])
ErrorMapper = TypeVar("ErrorMapper", bound=Callable[..., Any])
#: The stages a condition on an upstream milter can be asked at.
_CONDITION_STAGES = ("connect", "helo", "envfrom", "data")


async def _call(hook: Callable[[], Any]) -> None:
    result = hook()
    if inspect.isawaitable(result):
        await result


def _options_problem(exc: ValidationError) -> str:
    """A validation error of the App's options, in one line that names each option (and
    the valid ones, for an option that does not exist)."""
    unknown = [error["loc"][0] for error in exc.errors() if error["type"] == "extra_forbidden"]
    if unknown:
        valid = ", ".join(AppConfig.model_fields)
        return f"unknown option {unknown[0]!r} (valid: {valid})"
    return describe(exc)


class App(Dispatcher):
    """A milter application: handlers per event, options, and what to ask the MTA for.

    Args:
        name: the milter's name (logs, the demo header, ``ctx.app_name``).
        **options: any field of :class:`~milterapp.config.AppConfig`.

    Attributes:
        config: the validated options.
        serving: whether the app runs, and how to stop the server that runs it.
    """

    def __init__(self, name: str, **options: Any) -> None:
        self.name = name
        try:
            self.config = AppConfig(**options)
        except ValidationError as exc:
            raise SetupError(f"App({name!r}): {_options_problem(exc)}") from None
        super().__init__(self.config.fallback)
        self.serving = Serving(name)
        self._startup: list[Callable[[], Any]] = []
        self._shutdown: list[Callable[[], Any]] = []
        self._reload: list[Callable[[], Any]] = []
        self._upstreams: list[UpstreamMilter] = []
        self._handlers_at: int | None = None

    def __repr__(self) -> str:
        return f"<App {self.name!r}>"

    # --- registration --------------------------------------------------------------------

    def _check_not_started(self, what: str) -> None:
        if self.serving.started:
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

    def on_reload(self, hook: Hook) -> Hook:
        """Run ``hook()`` (plain or async) on SIGHUP or :meth:`reload`: reload lists, keys,
        settings. A hook that raises is logged as ``reload_failed``; the others still run."""
        self._check_not_started("add a reload hook")
        self._reload.append(hook)
        return hook

    def handles(self, name: str) -> bool:
        """Whether any handler is registered for event ``name``."""
        return bool(self._handlers.get(canonical_name(name)))

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

    # --- upstream milters ----------------------------------------------------------------

    def use_milter(
        self,
        spec: str,
        *,
        name: str,
        when: Callable[[Context[Any, Any]], object] | None = None,
        when_at: Literal["connect", "helo", "envfrom", "data"] = "envfrom",
        connect_timeout: float = 5.0,
        command_timeout: float = 8.0,
        eom_timeout: float = 120.0,
        on_failure: FailurePolicy = "tempfail",
        reuse: bool = True,
    ) -> UpstreamMilter:
        """Call the milter listening at ``spec`` for every MTA connection, as the MTA would,
        after the milters used before it (docs/chaining.md).

        Args:
            name: its name in logs, metrics and failures (letters, digits, ``_.-``).
            when: a condition: called with the context at ``when_at``; when it is false the
                milter is not given the rest of that message (at ``connect`` or ``helo``:
                of that connection).
            when_at: the stage whose facts ``when`` reads.
            connect_timeout: seconds to connect and negotiate.
            command_timeout: seconds for each command's answer.
            eom_timeout: seconds for the answer to end of message (restarted by each
                progress packet of the milter).
            on_failure: what a message gets when the milter is down, times out or breaks
                the protocol: ``tempfail`` (the default: nothing passes unchecked),
                ``reject``, or ``accept`` (go on without it).
            reuse: keep connections to it across MTA connections (QUIT_NC, version 6).

        Raises:
            SetupError: a bad spec, name or option, a name used twice, or the app is
                already serving.
        """
        from milterapp.chain.options import UpstreamOptions
        from milterapp.chain.party import UpstreamMilter

        self._check_not_started("add a milter")
        label = f"use_milter({spec!r}, name={name!r})"
        if any(upstream.name == name for upstream in self._upstreams):
            raise SetupError(f"{label}: another milter is called {name!r}")
        if when is not None and not callable(when):
            raise SetupError(f"{label}: when must be callable, not {when!r}")
        if when_at not in _CONDITION_STAGES:
            raise SetupError(f"{label}: when_at must be one of {', '.join(_CONDITION_STAGES)}")
        try:
            options = UpstreamOptions(
                name=name,
                spec=spec,  # type: ignore[arg-type]  # parsed by the model
                connect_timeout=connect_timeout,
                command_timeout=command_timeout,
                eom_timeout=eom_timeout,
                on_failure=on_failure,
            )
        except ValidationError as exc:
            raise SetupError(f"{label}: {describe(exc)}") from None
        upstream = UpstreamMilter(options, when=when, when_at=when_at, reuse=reuse)
        self._upstreams.append(upstream)
        if not self.config.keep_message:  # upstreams are replayed the message at its end
            self.config = self.config.model_copy(update={"keep_message": True})
        # Chained apps dispatch through the chain; the others keep the plain path.
        self.dispatch_now = self._dispatch_chained  # type: ignore[method-assign]
        return upstream

    def use_handlers(self) -> None:
        """Give the app's own handlers their turn here, after the milters used so far
        (by default they come first)."""
        self._check_not_started("place the handlers")
        self._handlers_at = len(self._upstreams)

    @property
    def upstreams(self) -> tuple[UpstreamMilter, ...]:
        """The upstream milters, in the order they were added."""
        return tuple(self._upstreams)

    def _parties(self) -> list[UpstreamMilter | None]:
        """The chain's parties in order; None stands for the app's own handlers (left out
        when it has none)."""
        at = self._handlers_at or 0
        own: list[UpstreamMilter | None] = [None] if self._handlers else []
        return [*self._upstreams[:at], *own, *self._upstreams[at:]]

    _dispatch_own = Dispatcher.dispatch_now

    def _dispatch_chained(
        self, name: str, event: Event, ctx: Context[Any, Any]
    ) -> Outcome | Coroutine[Any, Any, Outcome]:
        session = ctx.upstreams
        if session is not None:
            return session.dispatch(name, event, ctx)  # type: ignore[no-any-return]
        if isinstance(event, Negotiate):
            from milterapp.chain.session import ChainSession  # loaded by use_milter()

            session = ctx.upstreams = ChainSession(self._parties(), self._dispatch_own)
            return session.negotiate(event, ctx)
        return self._dispatch_own(name, event, ctx)

    def negotiated(
        self, offer: Negotiate, reply: NegotiationReply, ctx: Context[Any, Any]
    ) -> NegotiationReply:
        """The reply to the MTA: ``reply`` (what the handlers and options ask for), and
        what the upstream milters ask for too."""
        session = ctx.upstreams
        return reply if session is None else session.combined(reply)

    # --- negotiation ---------------------------------------------------------------------

    def requirements(self) -> Requirements:
        """What to ask the MTA for, derived from the handlers and the options.

        The events whose facts the context always holds (:data:`RECORDED_EVENTS`) are asked
        for whatever handlers exist, and so are headers and body when whole messages are
        kept; those that no handler answers are asked without a reply (the ``NR_*`` flags),
        so the MTA does not wait for them.
        """
        config = self.config
        handled: set[OptionalEvent] = {name for name in self._handlers if name in OPTIONAL_EVENTS}
        recorded = set(RECORDED_EVENTS)
        if config.keep_message:
            recorded |= KEPT_EVENTS
        no_reply = (set(config.no_reply) & handled) | (recorded - handled)
        return Requirements(
            events=frozenset(handled | recorded),
            no_reply=frozenset(no_reply),
            actions=ActionFlag.ALL & ~ActionFlag.SETSYMLIST
            if config.actions is None
            else config.actions,
            required_actions=config.actions or ActionFlag.NONE,
            macros=config.macro_requests(),
            leading_space=config.leading_space,
            rejected_recipients=config.rejected_recipients,
            # Skipping the body would cut what keep_message collects for end of message.
            skip="body" in handled and not config.keep_message,
            # Kept for the context only: decoded if and when a handler reads them. RCPT is
            # not, when the MTA marks the recipients it refused in the macros sent with it.
            undecoded=self._undecoded(handled),
        )

    def _undecoded(self, handled: set[OptionalEvent]) -> frozenset[OptionalEvent]:
        """The events asked for only to be kept: decoded when read, if ever."""
        # The content kept for end of message is kept as it came. The envelope is too,
        # unless upstream milters are sent it as it comes; RCPT is not when the MTA marks
        # the recipients it refused in the macros sent with it.
        kept: set[OptionalEvent] = set()
        if self.config.keep_message:
            kept |= KEPT_EVENTS | {"eoh"}
        if not self._upstreams:
            kept |= RECORDED_EVENTS - ({"envrcpt"} if self.config.rejected_recipients else set())
        return frozenset(kept - handled)

    # --- lifecycle -----------------------------------------------------------------------

    def setup_warnings(self) -> list[str]:
        """What the handlers appear to read that the app will not have, one line each.

        Read from the handlers' code, so a hint: a handler that calls
        ``ctx.message.as_email()`` in an app without ``keep_message=True`` would fail at
        every message. Logged as ``setup_warning`` when the app starts.
        """
        return setup_warnings(self._handlers, keep_message=self.config.keep_message)

    async def run_startup(self) -> None:
        """Log :meth:`setup_warnings`, then run the startup hooks in order; registration is
        closed from now on."""
        self.serving.mark_started()
        for warning in self.setup_warnings():
            _log.warning("setup_warning", app=self.name, warning=warning)
        for hook in self._startup:
            await _call(hook)

    async def run_shutdown(self) -> None:
        """Run the shutdown hooks in reverse order (every one, even if one fails), then
        close the connections kept to upstream milters."""
        for upstream in self._upstreams:
            await upstream.close_idle()
        errors: list[BaseException] = []
        for hook in reversed(self._shutdown):
            try:
                await _call(hook)
            except Exception as exc:  # noqa: BLE001 - run the others, then re-raise
                errors.append(exc)
        if errors:
            raise errors[0]

    async def run_reload(self) -> tuple[int, int]:
        """Run the reload hooks in order, each even if one before failed; return how many ran
        and how many failed."""
        failed = 0
        for hook in self._reload:
            try:
                await _call(hook)
            except Exception as exc:  # noqa: BLE001 - logged; that hook's old state stays
                failed += 1
                _log.error("reload_failed", app=self.name, hook=handler_label(hook), exc_info=exc)
        return len(self._reload), failed

    # --- running -------------------------------------------------------------------------

    def run(
        self, spec: str | None = None, *, argv: Sequence[str] | None = None, **options: Any
    ) -> None:
        """Serve until SIGTERM or SIGINT (for scripts); options: ``ServerOptions``, and
        ``workers``, ``loop``, ``log_format`` and ``log_level``.

        The command line (``argv``, by default ``sys.argv[1:]``) takes the options of
        ``milterapp run`` (``--help`` lists them) and overrides those given here; pass
        ``argv=[]`` when it is not the milter's. ``spec`` gives way to ``--spec``, and falls
        back on ``$MILTERAPP_SPEC``, then the loopback default. See
        :func:`milterapp.server.run`.
        """
        server.run(self, spec, argv=argv, **options)

    async def serve(self, spec: str | None = None, **options: Any) -> None:
        """Serve inside a running event loop until :meth:`shutdown` is called."""
        await server.serve(self, spec, **options)

    def shutdown(self) -> None:
        """Ask the running server to shut down gracefully; safe from any thread or signal.

        Does nothing when the app is not serving.
        """
        self.serving.stop()

    def reload(self) -> None:
        """Ask the running server to run the reload hooks, as SIGHUP does; safe from any
        thread or signal. Does nothing when the app is not serving."""
        self.serving.reload()
