"""What the server serves, and the handle an app is served through.

The server never imports the App: it serves anything that offers :class:`Servable`, as
werkzeug serves any WSGI application and never imports Flask. :class:`milterapp.App` is the
one everybody uses; the tests check that it conforms. :class:`Serving` is the handle an app
exposes as ``app.serving``: whether its startup hooks ran, whether a server runs it now, and
how to stop that server or have it run the reload hooks.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from types import CoroutineType
from typing import Any, Final, Protocol, TypeAlias, get_args

from typing_extensions import TypeIs

from milterapp.config import AppConfig
from milterapp.context import Context
from milterapp.errors import ServerError, ServerErrorKind
from milterapp.events import Event, Negotiate
from milterapp.protocol.negotiation import Requirements
from milterapp.replies import NegotiationReply, Shutdown, Verdict

__all__ = ["Outcome", "Servable", "Serving", "decided"]

#: What the handlers of one event decided: a verdict, Shutdown, or None (no handler, or
#: observers only).
Outcome: TypeAlias = Verdict | Shutdown | None
_OUTCOMES: Final = frozenset((*get_args(Verdict), Shutdown))


def decided(result: Outcome | Coroutine[Any, Any, Outcome]) -> TypeIs[Outcome]:
    """Whether what ``dispatch_now()`` gave is the outcome, rather than a coroutine to await.

    The usual cases are settled by the class alone: an ABC check costs several times as much,
    and this runs for every event whose handlers did not all continue.
    """
    kind = result.__class__
    if result is None or kind in _OUTCOMES:
        return True
    if kind is CoroutineType:
        return False
    return not isinstance(result, Coroutine)  # a subclass of a reply, or another coroutine


class Serving:
    """An app's serving state (``app.serving``), and the way to stop the server that runs it
    or have it reload.

    A server attaches itself while it runs; one app is served by one server at a time.
    """

    __slots__ = ("_name", "_reload", "_started", "_stop")

    def __init__(self, name: str) -> None:
        self._name = name
        self._started = False
        self._stop: Callable[[], None] | None = None
        self._reload: Callable[[], None] | None = None

    def __repr__(self) -> str:
        return f"<Serving {self._name!r} started={self._started} running={self.running}>"

    @property
    def started(self) -> bool:
        """The startup hooks ran: registration is closed from then on."""
        return self._started

    @property
    def running(self) -> bool:
        """A server serves the app now."""
        return self._stop is not None

    def stop(self) -> None:
        """Ask the server that runs the app to shut down gracefully.

        Safe from any thread and from signal handlers; does nothing when no server runs.
        """
        stop = self._stop
        if stop is not None:
            stop()

    def reload(self) -> None:
        """Ask the server that runs the app to run its reload hooks, as SIGHUP does.

        Safe from any thread and from signal handlers; does nothing when no server runs.
        """
        reload = self._reload
        if reload is not None:
            reload()

    def mark_started(self) -> None:
        """Record that the startup hooks ran (the app calls this)."""
        self._started = True

    def attach(self, stop: Callable[[], None], reload: Callable[[], None] | None = None) -> None:
        """A server starts serving the app; ``stop`` asks it to stop, ``reload`` to run the
        reload hooks (both thread-safe).

        Raises:
            ServerError: another server serves the app already (``kind`` RUNNING).
        """
        if self._stop is not None:
            raise ServerError(
                f"app {self._name!r} is already serving; call app.shutdown() first",
                kind=ServerErrorKind.RUNNING,
            )
        self._stop = stop
        self._reload = reload

    def detach(self, stop: Callable[[], None]) -> None:
        """The server that attached with ``stop`` no longer serves the app."""
        if self._stop == stop:  # not a newer server's
            self._stop = None
            self._reload = None


class Servable(Protocol):
    """What the server needs of an application: :class:`milterapp.App` offers it."""

    @property
    def name(self) -> str:
        """The application's name, in logs and ``ctx.app_name``."""

    @property
    def config(self) -> AppConfig:
        """Its options (the server reads the fallback, progress interval and body keeping)."""

    @property
    def serving(self) -> Serving:
        """Its serving state, which the server attaches to while it runs."""

    def requirements(self) -> Requirements:
        """What to negotiate with the MTA."""

    def negotiated(
        self, offer: Negotiate, reply: NegotiationReply, ctx: Context
    ) -> NegotiationReply:
        """The reply to send the MTA's ``offer``, given the one its requirements make
        (``reply``); the app's upstream milters, when it has some, ask for more."""

    def dispatch_now(
        self, name: str, event: Event, ctx: Context
    ) -> Outcome | Coroutine[Any, Any, Outcome]:
        """Run the handlers of stage ``name``: their outcome, or a coroutine that gives it
        once a handler had to be awaited."""

    async def run_startup(self) -> None:
        """Run the startup hooks, before the first connection."""

    async def run_shutdown(self) -> None:
        """Run the shutdown hooks, after the last connection."""

    async def run_reload(self) -> tuple[int, int]:
        """Run the reload hooks (on SIGHUP, while connections go on), each even if one
        failed; return how many ran and how many of them failed."""
