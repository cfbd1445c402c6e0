"""Choosing the event loop: uvloop when installed, asyncio's on request, clear errors."""

from __future__ import annotations

import asyncio
import builtins
from typing import Any

import pytest

from milterapp.errors import SetupError
from milterapp.server.loops import loop_factory, loop_name, run_in_loop


async def which() -> str:
    return loop_name()


def test_asyncio_on_request() -> None:
    assert run_in_loop(which(), "asyncio") == "asyncio"


def test_auto_takes_uvloop_when_installed() -> None:
    pytest.importorskip("uvloop", reason="uvloop is not installed (pip install .[speed])")
    assert run_in_loop(which(), "auto") == "uvloop"
    assert run_in_loop(which(), "uvloop") == "uvloop"


def test_auto_falls_back_to_asyncio_without_uvloop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("milterapp.server.loops._uvloop_installed", lambda: False)
    assert loop_factory("auto") is asyncio.new_event_loop


def test_uvloop_asked_for_but_missing_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def no_uvloop(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "uvloop":
            raise ImportError("No module named 'uvloop'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_uvloop)
    with pytest.raises(SetupError, match=r"loop: uvloop cannot be imported .*milterapp\[speed\]"):
        loop_factory("uvloop")


def test_an_unknown_loop_is_refused_and_the_coroutine_closed() -> None:
    main = which()
    with pytest.raises(
        SetupError, match=r"loop: must be one of auto, asyncio, uvloop \(not 'trio'\)"
    ):
        run_in_loop(main, "trio")
    assert main.cr_frame is None  # closed: no "never awaited" warning
