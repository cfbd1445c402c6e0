"""Which asyncio event loop serves: uvloop when installed (``milterapp[speed]``), or asyncio's.

uvloop's transports do the per-packet work of a milter connection (a read, a write per reply)
several times faster than asyncio's selector loop; docs/performance.md has the figures. The
choice is made once, when the server's loop starts.
"""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import Callable, Coroutine
from typing import Any, Final, Literal, TypeVar, get_args

from milterapp.errors import SetupError

__all__ = ["LOOP_NAMES", "LoopName", "loop_factory", "loop_name", "run_in_loop"]

LoopName = Literal["auto", "asyncio", "uvloop"]
LOOP_NAMES: Final[tuple[str, ...]] = get_args(LoopName)

T = TypeVar("T")


def _uvloop_installed() -> bool:
    return importlib.util.find_spec("uvloop") is not None


def loop_factory(name: str = "auto") -> Callable[[], asyncio.AbstractEventLoop]:
    """The event loop constructor for ``name``: ``auto`` takes uvloop if it is installed.

    Raises:
        SetupError: an unknown name, or ``uvloop`` asked for but not installed.
    """
    if name not in LOOP_NAMES:
        raise SetupError(f"loop: must be one of {', '.join(LOOP_NAMES)} (not {name!r})")
    if name == "asyncio" or (name == "auto" and not _uvloop_installed()):
        return asyncio.new_event_loop
    try:
        import uvloop
    except ImportError as exc:
        raise SetupError(
            f"loop: uvloop cannot be imported ({exc}); install it with "
            "pip install 'milterapp[speed]', or use --loop asyncio"
        ) from None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def loop_name(loop: asyncio.AbstractEventLoop | None = None) -> str:
    """``uvloop`` or ``asyncio``: which loop runs (the running one by default)."""
    loop = loop or asyncio.get_running_loop()
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"


def run_in_loop(main: Coroutine[Any, Any, T], name: str = "auto") -> T:
    """Run ``main`` to the end in a new event loop of kind ``name`` (see :func:`loop_factory`)."""
    try:
        factory = loop_factory(name)
    except SetupError:
        main.close()  # never started: no "never awaited" warning
        raise
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)
