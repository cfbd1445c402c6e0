"""Registering handlers, error mappers and lifecycle hooks; AppConfig validation."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
from pydantic import ValidationError

from milterapp.app import App
from milterapp.config import AppConfig
from milterapp.context import Context
from milterapp.errors import SetupError
from milterapp.events import EnvFrom, Event, Helo
from milterapp.handlers import ALIASES, EVENT_NAMES
from milterapp.replies import (
    Accept,
    Continue,
    Discard,
    Reject,
    Shutdown,
    Skip,
    TempFail,
)


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    async def bounded() -> Any:
        async with asyncio.timeout(5):
            return await coro

    return asyncio.run(bounded())


def handler(event: Event) -> None:
    return None


# --- event names ---------------------------------------------------------------------------


def test_event_names_and_aliases() -> None:
    assert EVENT_NAMES == (  # the order events arrive: the connection opens, then negotiation
        "open",
        "negotiate",
        "connect",
        "helo",
        "envfrom",
        "envrcpt",
        "data",
        "unknown",
        "header",
        "eoh",
        "body",
        "eom",
        "abort",
        "close",
    )
    assert set(ALIASES.values()) <= set(EVENT_NAMES)
    assert not set(ALIASES) & set(EVENT_NAMES)


@pytest.mark.parametrize("name", EVENT_NAMES)
def test_every_canonical_name_registers(name: str) -> None:
    app = App("t")
    assert not app.handles(name)
    app.on(name)(handler)
    assert app.handles(name)
    others = [other for other in EVENT_NAMES if other != name]
    assert not any(app.handles(other) for other in others)


@pytest.mark.parametrize(("alias", "canonical"), sorted(ALIASES.items()))
def test_every_alias_registers_under_its_canonical_name(alias: str, canonical: str) -> None:
    app = App("t")
    app.on(alias)(handler)
    assert app.handles(canonical)
    assert app.handles(alias)
    others = [other for other in EVENT_NAMES if other != canonical]
    assert not any(app.handles(other) for other in others)


@pytest.mark.parametrize(
    ("alias", "canonical"),
    [
        ("connection-established", "open"),
        ("envelope-from", "envfrom"),
        ("envelope-recipient", "envrcpt"),
        ("end-of-header", "eoh"),
        ("end-of-headers", "eoh"),
        ("end-of-message", "eom"),
        ("finished", "close"),
    ],
)
def test_alias_table(alias: str, canonical: str) -> None:
    assert ALIASES[alias] == canonical


def test_alias_and_canonical_handlers_share_one_chain() -> None:
    app = App("t")
    calls: list[str] = []
    app.add_handler("envfrom", lambda event: calls.append("canonical"))
    app.add_handler("envelope-from", lambda event: calls.append("alias"))
    ctx = Context(app_name="t", conn_id="1", peer="test", macros={})
    assert run(app.dispatch("envfrom", EnvFrom(address="a@example.org"), ctx)) == Continue()
    assert calls == ["canonical", "alias"]


def test_unknown_name_fails_at_decoration_time_listing_valid_names() -> None:
    app = App("t")
    with pytest.raises(SetupError, match="bogus") as info:
        app.on("bogus")  # the decorator itself raises: no function is needed
    message = str(info.value)
    assert "valid names" in message
    for name in (*EVENT_NAMES, *ALIASES):
        assert name in message


@pytest.mark.parametrize("name", ["bogus", "", "HELO", "Helo", "mail", "rcpt", "quit"])
def test_unknown_names_fail_everywhere(name: str) -> None:
    app = App("t")
    with pytest.raises(SetupError):
        app.on(name)
    with pytest.raises(SetupError):
        app.add_handler(name, handler)
    with pytest.raises(SetupError):
        app.handles(name)


# --- handler signatures ---------------------------------------------------------------------


def test_decorator_returns_the_function_unchanged() -> None:
    app = App("t")

    def on_helo(event: Helo, ctx: Context) -> None:
        return None

    decorated = app.on("helo")(on_helo)
    assert decorated is on_helo

    @app.on("envfrom")
    @app.on("envrcpt", timeout=3)
    async def both(event: Event) -> None:
        return None

    assert app.handles("envfrom")
    assert app.handles("envrcpt")
    assert asyncio.iscoroutinefunction(both)


def test_add_handler_plain_form() -> None:
    app = App("t")
    assert app.add_handler("helo", handler) is None
    assert app.add_handler("helo", handler, timeout=2.5) is None
    assert app.handles("helo")


def test_same_function_may_be_registered_twice() -> None:
    app = App("t")
    calls: list[object] = []
    app.add_handler("helo", calls.append)
    app.add_handler("helo", calls.append)
    ctx = Context(app_name="t", conn_id="1", peer="test", macros={})
    event = Helo(name="x")
    run(app.dispatch("helo", event, ctx))
    assert calls == [event, event]


class AsyncCallable:
    async def __call__(self, event: Event, ctx: Context) -> None:
        return None


def _event_only(event: Event) -> None:
    return None


def _event_ctx(event: Event, ctx: Context) -> None:
    return None


def _ctx_default(event: Event, ctx: Context | None = None) -> None:
    return None


def _all_defaults(event: Event | None = None, ctx: Context | None = None) -> None:
    return None


def _star_args(*args: Any) -> None:
    return None


def _event_star_args(event: Event, *args: Any) -> None:
    return None


def _with_kwargs(event: Event, ctx: Context, **kwargs: Any) -> None:
    return None


def _optional_keyword_only(event: Event, *, flag: bool = False) -> None:
    return None


def _positional_only(event: Event, ctx: Context, /) -> None:
    return None


async def _async_event_ctx(event: Event, ctx: Context) -> None:
    return None


class _Methods:
    def method(self, event: Event, ctx: Context) -> None:
        return None

    @staticmethod
    def static(event: Event) -> None:
        return None


@pytest.mark.parametrize(
    "fn",
    [
        _event_only,
        _event_ctx,
        _ctx_default,
        _all_defaults,
        _star_args,
        _event_star_args,
        _with_kwargs,
        _optional_keyword_only,
        _positional_only,
        _async_event_ctx,
        AsyncCallable(),
        _Methods().method,
        _Methods.static,
        functools.partial(_event_ctx),
        lambda event: None,
        print,
    ],
    ids=lambda fn: getattr(fn, "__name__", type(fn).__name__),
)
def test_accepted_signatures(fn: Callable[..., Any]) -> None:
    app = App("t")
    app.add_handler("helo", fn)
    assert app.handles("helo")


def _no_args() -> None:
    return None


def _three_required(event: Event, ctx: Context, extra: object) -> None:
    return None


async def _async_three_required(event: Event, ctx: Context, extra: object) -> None:
    return None


def _keyword_only_event(*, event: Event) -> None:
    return None


def _kwargs_only(**kwargs: Any) -> None:
    return None


@pytest.mark.parametrize(
    "fn",
    [_no_args, _three_required, _async_three_required, _keyword_only_event, _kwargs_only],
)
def test_wrong_arity_is_refused_naming_the_handler(fn: Callable[..., Any]) -> None:
    app = App("t")
    with pytest.raises(SetupError, match=fn.__name__) as info:
        app.add_handler("helo", fn)
    assert "(event, ctx)" in str(info.value)
    assert not app.handles("helo")


def test_wrong_arity_is_refused_by_the_decorator() -> None:
    app = App("t")
    register = app.on("helo")
    with pytest.raises(SetupError, match="_three_required"):
        register(_three_required)
    assert not app.handles("helo")


def test_lambda_with_no_args_is_refused() -> None:
    app = App("t")
    with pytest.raises(SetupError, match="lambda"):
        app.add_handler("helo", lambda: None)


def _required_keyword_only(event: Event, *, extra: object) -> None:
    return None


def _three_required_and_star_args(event: Event, ctx: Context, extra: object, *rest: Any) -> None:
    return None


def test_required_keyword_only_parameter_is_refused() -> None:
    app = App("t")
    with pytest.raises(SetupError, match="_required_keyword_only"):
        app.add_handler("helo", _required_keyword_only)


def test_three_required_with_star_args_is_refused() -> None:
    app = App("t")
    with pytest.raises(SetupError, match="_three_required_and_star_args"):
        app.add_handler("helo", _three_required_and_star_args)


@pytest.mark.parametrize("thing", [42, "handler", None, Helo(name="x")])
def test_non_callable_is_refused(thing: object) -> None:
    app = App("t")
    with pytest.raises(SetupError, match="callable"):
        app.add_handler("helo", thing)  # type: ignore[arg-type]
    with pytest.raises(SetupError, match="callable"):
        app.on("helo")(thing)  # type: ignore[type-var]
    assert not app.handles("helo")


@pytest.mark.parametrize("timeout", [0, 0.0, -1, -0.001])
def test_non_positive_timeout_is_refused(timeout: float) -> None:
    app = App("t")
    with pytest.raises(SetupError, match="timeout"):
        app.add_handler("helo", handler, timeout=timeout)
    with pytest.raises(SetupError, match="timeout"):
        app.on("helo", timeout=timeout)(handler)
    assert not app.handles("helo")


# --- registration closes when serving starts ------------------------------------------------


def test_registration_after_startup_is_refused() -> None:
    app = App("t")
    app.on("helo")(handler)
    run(app.run_startup())
    with pytest.raises(SetupError, match="already serving"):
        app.add_handler("helo", handler)
    with pytest.raises(SetupError, match="already serving"):
        app.on("envfrom")(handler)
    with pytest.raises(SetupError, match="already serving"):
        app.on_error(ValueError)(lambda exc, ctx: None)
    with pytest.raises(SetupError, match="already serving"):
        app.on_startup(lambda: None)
    with pytest.raises(SetupError, match="already serving"):
        app.on_shutdown(lambda: None)
    assert not app.handles("envfrom")
    assert app.handles("helo")


def test_unknown_name_after_startup_still_says_unknown() -> None:
    app = App("t")
    run(app.run_startup())
    with pytest.raises(SetupError, match="unknown event name"):
        app.on("bogus")


# --- on_error --------------------------------------------------------------------------------


@pytest.mark.parametrize("thing", [ValueError("instance"), "ValueError", 42, None, int, object])
def test_on_error_needs_an_exception_class(thing: Any) -> None:
    app = App("t")
    with pytest.raises(SetupError, match="exception class"):
        app.on_error(thing)


@pytest.mark.parametrize("exc_type", [Exception, ValueError, TimeoutError, BaseException])
def test_on_error_accepts_exception_classes_and_returns_the_mapper(
    exc_type: type[BaseException],
) -> None:
    app = App("t")

    def mapper(exc: BaseException, ctx: Context) -> Reject:
        return Reject()

    assert app.on_error(exc_type)(mapper) is mapper


def test_on_error_mapper_must_take_exc_and_ctx() -> None:
    app = App("t")

    def one_arg(exc: BaseException) -> None:
        return None

    with pytest.raises(SetupError, match="one_arg"):
        app.on_error(ValueError)(one_arg)


# --- lifecycle hooks ------------------------------------------------------------------------


def test_startup_hooks_run_in_order_sync_and_async() -> None:
    app = App("t")
    calls: list[str] = []

    @app.on_startup
    def first() -> None:
        calls.append("first")

    @app.on_startup
    async def second() -> None:
        calls.append("second")

    app.on_startup(lambda: calls.append("third"))  # type: ignore[arg-type, func-returns-value]
    assert first.__name__ == "first"
    assert asyncio.iscoroutinefunction(second)
    run(app.run_startup())
    assert calls == ["first", "second", "third"]


def test_startup_error_propagates() -> None:
    app = App("t")

    @app.on_startup
    async def broken() -> None:
        raise RuntimeError("no database")

    with pytest.raises(RuntimeError, match="no database"):
        run(app.run_startup())


def test_shutdown_hooks_run_in_reverse_order_sync_and_async() -> None:
    app = App("t")
    calls: list[str] = []

    @app.on_shutdown
    def first() -> None:
        calls.append("first")

    @app.on_shutdown
    async def second() -> None:
        calls.append("second")

    @app.on_shutdown
    def third() -> None:
        calls.append("third")

    run(app.run_shutdown())
    assert calls == ["third", "second", "first"]


def test_shutdown_runs_every_hook_and_reraises_the_first_error() -> None:
    app = App("t")
    calls: list[str] = []

    @app.on_shutdown
    def registered_first() -> None:
        calls.append("registered_first")
        raise ValueError("raised last")

    @app.on_shutdown
    def ok() -> None:
        calls.append("ok")

    @app.on_shutdown
    async def registered_last() -> None:
        calls.append("registered_last")
        raise RuntimeError("raised first")

    with pytest.raises(RuntimeError, match="raised first"):
        run(app.run_shutdown())
    assert calls == ["registered_last", "ok", "registered_first"]


def test_no_hooks_is_fine() -> None:
    app = App("t")
    run(app.run_startup())
    run(app.run_shutdown())


# --- AppConfig ------------------------------------------------------------------------------


def test_defaults() -> None:
    config = App("t").config
    assert config == AppConfig()
    assert config.fallback == TempFail()
    assert config.handler_timeout == 25.0
    assert config.actions is None
    assert config.macros == {}
    assert config.no_reply == frozenset()
    assert config.keep_message is False


@pytest.mark.parametrize("fallback", [TempFail(), Reject(), Discard(), Accept(), Continue()])
def test_valid_fallbacks(fallback: object) -> None:
    assert App("t", fallback=fallback).config.fallback == fallback


def test_fallback_keeps_its_reply_text() -> None:
    fallback = TempFail(code=421, xcode="4.3.0", text="try later")
    assert App("t", fallback=fallback).config.fallback == fallback


def test_handler_timeout_may_be_none() -> None:
    assert App("t", handler_timeout=None).config.handler_timeout is None


@pytest.mark.parametrize(
    "options",
    [
        {"handler_timeout": 0},
        {"handler_timeout": -1},
        {"progress_interval": 0},
        {"spool_threshold": -1},
        {"bogus": True},
        {"handler_timout": 5},
        {"macros": {"bogus": ["i"]}},
        {"macros": {"abort": ["i"]}},
        {"no_reply": ["eom"]},
        {"no_reply": ["bogus"]},
        {"fallback": Skip()},
        {"fallback": Shutdown()},
        {"fallback": "tempfail"},
        {"actions": "everything"},
    ],
    ids=repr,
)
def test_invalid_options_are_refused(options: dict[str, Any]) -> None:
    option = next(iter(options))
    with pytest.raises(
        SetupError, match=rf"^App\('t'\): (unknown option '{option}'|{option}: )"
    ) as info:
        App("t", **options)
    assert "\n" not in str(info.value)


def test_an_unknown_option_is_named_with_the_valid_ones() -> None:
    with pytest.raises(SetupError, match=r"unknown option 'keep_mesage' \(valid: .*keep_message"):
        App("t", keep_mesage=True)


def test_a_union_option_names_its_kinds() -> None:
    with pytest.raises(
        SetupError, match=r"fallback: must be TempFail\(\) or Reject\(\) or Discard\(\) or Accept"
    ):
        App("t", fallback=3)


def test_config_is_frozen() -> None:
    app = App("t")
    with pytest.raises(ValidationError):
        app.config.handler_timeout = 1  # type: ignore[misc]


@pytest.mark.parametrize("name", ["bad name", "a,b", ""])
def test_bad_macro_names_are_refused_when_the_app_is_created(name: str) -> None:
    with pytest.raises(SetupError, match="macros: "):
        App("t", macros={"envfrom": [name]})


def test_app_and_context_are_exported_from_the_package() -> None:
    # README, docs and examples import them so: ``from milterapp import App, Context``.
    import milterapp

    assert milterapp.App is App
    assert milterapp.Context is Context
    assert "App" in milterapp.__all__
    assert "Context" in milterapp.__all__
    assert "ConnectionOpened" in milterapp.__all__
