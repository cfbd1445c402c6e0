"""App.dispatch(): running handlers, combining replies, failing closed.

No server and no sockets: a Context is built directly and coroutines run with asyncio.run.
Every test runs inside ``structlog.testing.capture_logs`` (an autouse fixture); tests that
check what was logged take the ``log`` fixture.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from typing import Any

import pytest
import structlog.testing

from milterapp.app import App
from milterapp.constants import ActionFlag, ProtocolFlag
from milterapp.context import Context
from milterapp.events import (
    Abort,
    AddressFamily,
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
    Header,
    Helo,
    Negotiate,
    Quit,
    Unknown,
)
from milterapp.handlers import EVENT_NAMES
from milterapp.replies import (
    Accept,
    AddHeader,
    Continue,
    Discard,
    Reject,
    Shutdown,
    Skip,
    TempFail,
    Verdict,
)

Result = Verdict | Shutdown | None

EVENTS: dict[str, Event] = {
    "negotiate": Negotiate(version=6, actions=ActionFlag.ALL, protocol=ProtocolFlag.NONE),
    "open": ConnectionOpened(peer="test"),
    "connect": Connect(hostname="client.example", family=AddressFamily.UNKNOWN),
    "helo": Helo(name="client.example"),
    "envfrom": EnvFrom(address="sender@example.org"),
    "envrcpt": EnvRcpt(address="rcpt@example.net"),
    "data": Data(),
    "unknown": Unknown(line="XYZZY"),
    "header": Header(name="Subject", value="hello"),
    "eoh": EndOfHeaders(),
    "body": Body(chunk=b"body\r\n"),
    "eom": EndOfMessage(),
    "abort": Abort(),
    "close": Quit(),
}
OBSERVERS = ("negotiate", "open", "abort", "close")
ANSWERED = tuple(name for name in EVENT_NAMES if name not in OBSERVERS)
CONNECTION_STAGES = ("connect", "helo", "unknown")
MESSAGE_STAGES = ("envfrom", "envrcpt", "data", "header", "eoh", "body", "eom")


class Logs:
    """The log entries captured during one test."""

    def __init__(self, entries: list[dict[str, Any]]) -> None:
        self.records = entries

    def named(self, message: str) -> list[dict[str, Any]]:
        return [entry for entry in self.records if entry["event"] == message]


@pytest.fixture(autouse=True)
def captured() -> Iterator[list[dict[str, Any]]]:
    with structlog.testing.capture_logs() as entries:
        yield entries


@pytest.fixture
def log(captured: list[dict[str, Any]]) -> Logs:
    return Logs(captured)


def make_ctx() -> Context:
    return Context(app_name="t", conn_id="1", peer="test", macros={})


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    async def bounded() -> Any:
        async with asyncio.timeout(5):
            return await coro

    return asyncio.run(bounded())


def dispatch(app: App, name: str, ctx: Context | None = None) -> Result:
    if ctx is None:
        ctx = make_ctx()
    result: Result = run(app.dispatch(name, EVENTS[name], ctx))
    return result


def returning(reply: object) -> Callable[[Event], object]:
    def handler(event: Event) -> object:
        return reply

    return handler


def failing(event: Event) -> None:
    raise ValueError("handler bug")


def assert_one_failure(log: Logs, handler: str, stage: str, reason: str) -> None:
    failures = log.named("handler_failed")
    assert len(failures) == 1, log.records
    failure = failures[0]
    assert failure["log_level"] == "error"
    assert handler in failure["handler"]  # a qualname, or the repr of a callable object
    assert failure["stage"] == stage
    assert failure["reason"] == reason
    assert isinstance(failure["exc_info"], Exception)


# --- running handlers -----------------------------------------------------------------------


@pytest.mark.parametrize("name", EVENT_NAMES)
def test_no_handler_gives_none(name: str) -> None:
    app = App("t")
    app.add_handler("helo" if name != "helo" else "envfrom", returning(Reject()))
    assert dispatch(app, name) is None


@pytest.mark.parametrize("name", EVENT_NAMES)
def test_handlers_run_in_registration_order(name: str) -> None:
    app = App("t")
    calls: list[int] = []

    def recorder(number: int) -> Callable[[Event], None]:
        return lambda event: calls.append(number)

    for number in range(5):
        app.add_handler(name, recorder(number))
    dispatch(app, name)
    assert calls == [0, 1, 2, 3, 4]


def test_sync_and_async_handlers_mixed() -> None:
    app = App("t")
    calls: list[str] = []

    @app.on("helo")
    def first(event: Helo) -> None:
        calls.append("sync 1")

    @app.on("helo")
    async def second(event: Helo, ctx: Context) -> None:
        await asyncio.sleep(0)
        calls.append("async 2")

    @app.on("helo")
    def third(event: Helo, ctx: Context) -> Continue:
        calls.append("sync 3")
        return Continue()

    @app.on("helo")
    async def fourth(event: Helo) -> Accept:
        calls.append("async 4")
        return Accept()

    assert dispatch(app, "helo") == Accept()
    assert calls == ["sync 1", "async 2", "sync 3", "async 4"]


def test_handlers_get_the_event_and_the_context() -> None:
    app = App("t")
    seen: list[tuple[Any, ...]] = []

    @app.on("envfrom")
    def event_only(event: EnvFrom) -> None:
        seen.append(("event_only", event))

    @app.on("envfrom")
    async def event_ctx(event: EnvFrom, ctx: Context) -> None:
        seen.append(("event_ctx", event, ctx))

    @app.on("envfrom")
    def ctx_default(event: EnvFrom, ctx: Context | None = None) -> None:
        seen.append(("ctx_default", event, ctx))

    @app.on("envfrom")
    def star_args(*args: Any) -> None:
        seen.append(("star_args", *args))

    @app.on("envfrom")
    def optional_event(event: EnvFrom | None = None) -> None:
        seen.append(("optional_event", event))

    ctx = make_ctx()
    event = EVENTS["envfrom"]
    run(app.dispatch("envfrom", event, ctx))
    assert seen == [
        ("event_only", event),
        ("event_ctx", event, ctx),
        ("ctx_default", event, ctx),
        ("star_args", event, ctx),
        ("optional_event", event),
    ]
    assert seen[1][2] is ctx


class AsyncHandler:
    def __init__(self, reply: Result) -> None:
        self.reply = reply
        self.calls: list[tuple[Event, Context]] = []

    async def __call__(self, event: Event, ctx: Context) -> Result:
        self.calls.append((event, ctx))
        await asyncio.sleep(0)
        return self.reply


def test_callable_object_with_async_call(log: Logs) -> None:
    app = App("t")
    handler = AsyncHandler(Reject(text="object says no"))
    app.add_handler("envrcpt", handler)
    ctx = make_ctx()
    assert run(app.dispatch("envrcpt", EVENTS["envrcpt"], ctx)) == Reject(text="object says no")
    assert handler.calls == [(EVENTS["envrcpt"], ctx)]
    assert log.named("handler_failed") == []


class NeverAnswers:
    def __init__(self) -> None:
        self.started = False

    async def __call__(self, event: Event) -> Result:
        self.started = True
        await asyncio.Event().wait()
        return Accept()


def test_callable_object_with_async_call_is_bounded_by_the_timeout(log: Logs) -> None:
    app = App("t", handler_timeout=0.05)
    handler = NeverAnswers()
    app.add_handler("helo", handler)
    ctx = make_ctx()
    assert run(app.dispatch("helo", EVENTS["helo"], ctx)) == TempFail()
    assert handler.started
    assert_one_failure(log, "NeverAnswers", "helo", "timed out")


def test_plain_function_returning_a_coroutine_is_awaited() -> None:
    app = App("t")

    async def decide_later(event: Event) -> Reject:
        await asyncio.sleep(0)
        return Reject(text="later")

    def plain(event: Event) -> Awaitable[Reject]:
        return decide_later(event)

    app.add_handler("envfrom", plain)
    assert dispatch(app, "envfrom") == Reject(text="later")


def test_plain_function_returning_a_coroutine_is_bounded_by_the_timeout(log: Logs) -> None:
    app = App("t", handler_timeout=0.05)

    async def forever() -> Result:
        await asyncio.Event().wait()
        return Accept()

    def plain(event: Event) -> Awaitable[Result]:
        return forever()

    app.add_handler("envfrom", plain)
    ctx = make_ctx()
    assert run(app.dispatch("envfrom", EVENTS["envfrom"], ctx)) == TempFail()
    assert_one_failure(log, "plain", "envfrom", "timed out")


# --- observers ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", OBSERVERS)
def test_observers_give_none(log: Logs, name: str) -> None:
    app = App("t")
    calls: list[str] = []
    app.add_handler(name, lambda event: calls.append("first"))
    app.add_handler(name, lambda event, ctx: calls.append("second"))
    ctx = make_ctx()
    assert run(app.dispatch(name, EVENTS[name], ctx)) is None
    assert calls == ["first", "second"]
    assert log.records == []


@pytest.mark.parametrize("name", OBSERVERS)
@pytest.mark.parametrize("reply", [Reject(), TempFail(), Accept(), Continue(), "ok"], ids=repr)
def test_observer_returning_something_is_a_logged_failure(
    log: Logs, name: str, reply: object
) -> None:
    app = App("t", fallback=Reject())
    calls: list[str] = []

    def answers(event: Event) -> object:
        calls.append("answers")
        return reply

    app.add_handler(name, answers)
    app.add_handler(name, lambda event: calls.append("next"))
    ctx = make_ctx()
    assert run(app.dispatch(name, EVENTS[name], ctx)) is None
    assert calls == ["answers", "next"]  # a refusal does not stop an observer chain
    assert_one_failure(log, "answers", name, "raised")
    assert "observe" in str(log.named("handler_failed")[0]["exc_info"])


@pytest.mark.parametrize("name", OBSERVERS)
def test_observer_raising_is_logged_and_not_mapped(log: Logs, name: str) -> None:
    app = App("t", fallback=Reject())
    mapped: list[BaseException] = []

    @app.on_error(Exception)
    def mapper(exc: Exception, ctx: Context) -> Reject:
        mapped.append(exc)
        return Reject()

    calls: list[str] = []
    app.add_handler(name, failing)
    app.add_handler(name, lambda event: calls.append("next"))
    ctx = make_ctx()
    assert run(app.dispatch(name, EVENTS[name], ctx)) is None
    assert calls == ["next"]
    assert mapped == []
    assert_one_failure(log, "failing", name, "raised")


def test_observer_timing_out_gives_none(log: Logs) -> None:
    app = App("t", handler_timeout=0.05)

    @app.on("close")
    async def slow(event: Event) -> None:
        await asyncio.Event().wait()

    ctx = make_ctx()
    assert run(app.dispatch("close", ConnectionClosed(), ctx)) is None
    assert_one_failure(log, "slow", "close", "timed out")


# --- valid and invalid replies ----------------------------------------------------------------

VALID: dict[str, tuple[Verdict | Shutdown, ...]] = {
    **{
        name: (Continue(), Accept(), Reject(), TempFail(), Shutdown()) for name in CONNECTION_STAGES
    },
    **{
        name: (Continue(), Accept(), Reject(), TempFail(), Shutdown(), Discard())
        for name in MESSAGE_STAGES
    },
}
VALID["body"] = (*VALID["body"], Skip())
ALL_VERDICTS = (Continue(), Accept(), Reject(), TempFail(), Shutdown(), Discard(), Skip())


@pytest.mark.parametrize(
    ("name", "reply"),
    [(name, reply) for name, replies in VALID.items() for reply in replies],
    ids=repr,
)
def test_valid_reply_is_returned(log: Logs, name: str, reply: Verdict | Shutdown) -> None:
    app = App("t")
    app.add_handler(name, returning(reply))
    ctx = make_ctx()
    assert run(app.dispatch(name, EVENTS[name], ctx)) == reply
    assert log.records == []


@pytest.mark.parametrize(
    ("name", "reply"),
    [
        (name, reply)
        for name in ANSWERED
        for reply in ALL_VERDICTS
        if type(reply) not in {type(valid) for valid in VALID[name]}
    ],
    ids=repr,
)
def test_reply_invalid_for_the_stage_gives_the_fallback(
    log: Logs, name: str, reply: Verdict | Shutdown
) -> None:
    app = App("t")
    app.add_handler(name, returning(reply))
    ctx = make_ctx()
    assert run(app.dispatch(name, EVENTS[name], ctx)) == TempFail()
    assert_one_failure(log, "handler", name, "raised")
    assert "not a valid" in str(log.named("handler_failed")[0]["exc_info"])


def test_invalid_reply_table_covers_the_brief() -> None:
    assert Discard() not in VALID["helo"]
    assert Discard() not in VALID["connect"]
    assert Skip() not in VALID["envfrom"]
    assert Skip() not in VALID["eom"]
    assert Skip() in VALID["body"]


@pytest.mark.parametrize(
    "reply",
    [
        "ok",
        42,
        True,
        b"reject",
        AddHeader(name="X-Test", value="1"),
        Reject,  # the class, not an instance
        [Reject()],
        {"code": 550},
    ],
    ids=repr,
)
def test_non_reply_gives_the_fallback(log: Logs, reply: object) -> None:
    app = App("t", fallback=Reject(text="fallback"))
    app.add_handler("envfrom", returning(reply))
    ctx = make_ctx()
    assert run(app.dispatch("envfrom", EVENTS["envfrom"], ctx)) == Reject(text="fallback")
    assert_one_failure(log, "handler", "envfrom", "raised")


def test_async_non_reply_gives_the_fallback(log: Logs) -> None:
    app = App("t")

    @app.on("eom")
    async def oops(event: EndOfMessage, ctx: Context) -> object:
        return AddHeader(name="X-Spam", value="yes")  # should have been ctx.add_header

    ctx = make_ctx()
    assert run(app.dispatch("eom", EVENTS["eom"], ctx)) == TempFail()
    assert_one_failure(log, "oops", "eom", "raised")


# --- combining replies ------------------------------------------------------------------------


@pytest.mark.parametrize("refusal", [Reject(text="no"), TempFail(), Discard(), Shutdown()])
def test_first_restrictive_verdict_stops_the_chain(refusal: Verdict | Shutdown) -> None:
    app = App("t")
    calls: list[str] = []

    def first(event: Event) -> Result:
        calls.append("first")
        return Accept()

    def second(event: Event) -> Result:
        calls.append("second")
        return refusal

    async def third(event: Event) -> Result:
        calls.append("third")
        return Reject(text="third")

    for fn in (first, second, third):
        app.add_handler("envrcpt", fn)
    result = dispatch(app, "envrcpt")
    assert result is refusal
    assert calls == ["first", "second"]


def test_accept_does_not_stop_the_chain() -> None:
    app = App("t")
    calls: list[str] = []

    @app.on("envfrom")
    def accepts(event: Event) -> Accept:
        calls.append("accepts")
        return Accept()

    @app.on("envfrom")
    def no_opinion(event: Event) -> None:
        calls.append("no_opinion")

    assert dispatch(app, "envfrom") == Accept()
    assert calls == ["accepts", "no_opinion"]


def test_accept_then_refusal_gives_the_refusal() -> None:
    app = App("t")
    app.add_handler("envfrom", returning(Accept()))
    app.add_handler("envfrom", returning(Reject(text="later")))
    assert dispatch(app, "envfrom") == Reject(text="later")


@pytest.mark.parametrize(
    ("replies", "expected"),
    [
        ([None], Continue()),
        ([None, Continue()], Continue()),
        ([Skip(), Skip()], Skip()),
        ([Skip(), None], Continue()),
        ([Skip(), Accept()], Accept()),
        ([Skip(), Discard()], Discard()),
    ],
    ids=repr,
)
def test_body_replies_combine(replies: list[Result], expected: Verdict) -> None:
    app = App("t")
    for reply in replies:
        app.add_handler("body", returning(reply))
    assert dispatch(app, "body") == expected


# --- failures and the fallback ---------------------------------------------------------------


@pytest.mark.parametrize("name", ANSWERED)
def test_raising_handler_gives_tempfail_by_default(log: Logs, name: str) -> None:
    app = App("t")
    app.add_handler(name, failing)
    ctx = make_ctx()
    assert run(app.dispatch(name, EVENTS[name], ctx)) == TempFail()
    assert_one_failure(log, "failing", name, "raised")


@pytest.mark.parametrize(
    "fallback",
    [Reject(), Reject(code=554, text="policy"), TempFail(code=421), Accept(), Continue()],
    ids=repr,
)
@pytest.mark.parametrize("name", ["connect", "helo", "envfrom", "eom"])
def test_raising_handler_gives_the_configured_fallback(fallback: Verdict, name: str) -> None:
    app = App("t", fallback=fallback)
    app.add_handler(name, failing)
    assert dispatch(app, name) == fallback


@pytest.mark.parametrize("name", CONNECTION_STAGES)
def test_discard_fallback_at_a_connection_stage_gives_tempfail(name: str) -> None:
    app = App("t", fallback=Discard())
    app.add_handler(name, failing)
    assert dispatch(app, name) == TempFail()


@pytest.mark.parametrize("name", MESSAGE_STAGES)
def test_discard_fallback_at_a_message_stage(name: str) -> None:
    app = App("t", fallback=Discard())
    app.add_handler(name, failing)
    assert dispatch(app, name) == Discard()


def test_restrictive_fallback_stops_the_chain() -> None:
    app = App("t")
    calls: list[str] = []
    app.add_handler("envfrom", failing)
    app.add_handler("envfrom", lambda event: calls.append("after"))
    assert dispatch(app, "envfrom") == TempFail()
    assert calls == []


@pytest.mark.parametrize("fallback", [Accept(), Continue()])
def test_permissive_fallback_lets_the_chain_go_on(fallback: Verdict) -> None:
    app = App("t", fallback=fallback)
    calls: list[str] = []
    app.add_handler("envfrom", failing)
    app.add_handler("envfrom", lambda event: calls.append("after"))
    app.add_handler("envfrom", returning(Reject(text="after")))
    assert dispatch(app, "envfrom") == Reject(text="after")
    assert calls == ["after"]


def test_one_failure_among_several_handlers(log: Logs) -> None:
    app = App("t", fallback=Continue())
    app.add_handler("helo", returning(Accept()))
    app.add_handler("helo", failing)
    ctx = make_ctx()
    assert run(app.dispatch("helo", EVENTS["helo"], ctx)) == Accept()
    assert_one_failure(log, "failing", "helo", "raised")


class Fatal(BaseException):
    """Not an Exception: must not be swallowed by the fail-closed machinery."""


def test_base_exceptions_are_not_swallowed() -> None:
    app = App("t", fallback=Accept())

    @app.on("helo")
    def fatal(event: Event) -> None:
        raise Fatal

    with pytest.raises(Fatal):
        dispatch(app, "helo")


# --- timeouts ---------------------------------------------------------------------------------


def test_timing_out_handler_gives_the_fallback(log: Logs) -> None:
    app = App("t", handler_timeout=0.05)
    started = asyncio.Event()

    @app.on("envfrom")
    async def stuck(event: Event) -> Accept:
        started.set()
        await asyncio.Event().wait()
        return Accept()

    ctx = make_ctx()
    assert run(app.dispatch("envfrom", EVENTS["envfrom"], ctx)) == TempFail()
    assert started.is_set()
    assert_one_failure(log, "stuck", "envfrom", "timed out")
    assert log.named("handler_failed")[0]["timeout"] == 0.05


def test_timing_out_handler_gives_the_configured_fallback() -> None:
    app = App("t", handler_timeout=0.05, fallback=Reject(text="too slow"))

    @app.on("eom")
    async def stuck(event: Event) -> None:
        await asyncio.Event().wait()

    assert dispatch(app, "eom") == Reject(text="too slow")


def test_per_handler_timeout_overrides_no_app_limit(log: Logs) -> None:
    app = App("t", handler_timeout=None)

    @app.on("helo", timeout=0.05)
    async def stuck(event: Event) -> None:
        await asyncio.Event().wait()

    ctx = make_ctx()
    assert run(app.dispatch("helo", EVENTS["helo"], ctx)) == TempFail()
    assert_one_failure(log, "stuck", "helo", "timed out")
    assert log.named("handler_failed")[0]["timeout"] == 0.05


def test_per_handler_timeout_overrides_a_shorter_app_default() -> None:
    # The gate opens on a loop timer set later than the app's default deadline: a handler
    # bound by the default times out first, one with its own longer deadline does not.
    async def scenario(own_timeout: float | None) -> Result:
        app = App("t", handler_timeout=0.01)
        gate = asyncio.Event()

        async def waits_for_gate(event: Event) -> Accept:
            await gate.wait()
            return Accept()

        app.add_handler("helo", waits_for_gate, timeout=own_timeout)
        ctx = make_ctx()
        asyncio.get_running_loop().call_later(0.05, gate.set)
        return await app.dispatch("helo", EVENTS["helo"], ctx)

    assert run(scenario(own_timeout=5)) == Accept()
    assert run(scenario(own_timeout=None)) == TempFail()


def test_handler_finishing_in_time_is_not_affected(log: Logs) -> None:
    app = App("t", handler_timeout=5)

    @app.on("envrcpt")
    async def quick(event: Event) -> Reject:
        await asyncio.sleep(0)
        return Reject()

    ctx = make_ctx()
    assert run(app.dispatch("envrcpt", EVENTS["envrcpt"], ctx)) == Reject()
    assert log.records == []


# --- on_error ---------------------------------------------------------------------------------


class BaseFailure(Exception):
    pass


class MiddleFailure(BaseFailure):
    pass


class LeafFailure(MiddleFailure):
    pass


def raising(exc: Exception) -> Callable[[Event], None]:
    def handler(event: Event) -> None:
        raise exc

    return handler


def test_mapper_gets_the_exception_and_the_context(log: Logs) -> None:
    app = App("t")
    seen: list[tuple[BaseException, Context]] = []
    error = LeafFailure("boom")

    @app.on_error(LeafFailure)
    def mapper(exc: LeafFailure, ctx: Context) -> Reject:
        seen.append((exc, ctx))
        return Reject(text="mapped")

    app.add_handler("envfrom", raising(error))
    ctx = make_ctx()
    assert run(app.dispatch("envfrom", EVENTS["envfrom"], ctx)) == Reject(text="mapped")
    assert seen == [(error, ctx)]
    assert seen[0][0] is error
    assert_one_failure(log, "handler", "envfrom", "raised")  # still logged


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (LeafFailure(), "middle"),
        (MiddleFailure(), "middle"),
        (BaseFailure(), "exception"),
        (ValueError(), "value"),
        (UnicodeDecodeError("utf-8", b"\xff", 0, 1, "bad"), "value"),
        (KeyError("k"), "exception"),
    ],
    ids=repr,
)
def test_most_specific_mapper_by_mro_wins(exc: Exception, expected: str) -> None:
    app = App("t")
    # Registered from general to specific and back: registration order must not matter.
    app.on_error(Exception)(lambda exc, ctx: Reject(text="exception"))
    app.on_error(MiddleFailure)(lambda exc, ctx: Reject(text="middle"))
    app.on_error(ValueError)(lambda exc, ctx: Reject(text="value"))
    app.add_handler("envfrom", raising(exc))
    assert dispatch(app, "envfrom") == Reject(text=expected)


def test_reregistering_a_class_replaces_its_mapper() -> None:
    app = App("t")
    app.on_error(ValueError)(lambda exc, ctx: Reject(text="first"))
    app.on_error(ValueError)(lambda exc, ctx: Reject(text="second"))
    app.add_handler("envfrom", raising(ValueError()))
    assert dispatch(app, "envfrom") == Reject(text="second")


def test_unmapped_exception_gives_the_fallback() -> None:
    app = App("t", fallback=Reject(text="fallback"))
    app.on_error(KeyError)(lambda exc, ctx: Accept())
    app.add_handler("envfrom", raising(ValueError()))
    assert dispatch(app, "envfrom") == Reject(text="fallback")


def test_async_mapper() -> None:
    app = App("t")

    @app.on_error(BaseFailure)
    async def mapper(exc: BaseFailure, ctx: Context) -> TempFail:
        await asyncio.sleep(0)
        return TempFail(code=421, text="mapped later")

    app.add_handler("helo", raising(LeafFailure()))
    assert dispatch(app, "helo") == TempFail(code=421, text="mapped later")


def test_mapper_returning_none_gives_the_fallback() -> None:
    app = App("t", fallback=Reject(text="fallback"))
    app.on_error(ValueError)(lambda exc, ctx: None)
    app.add_handler("envfrom", raising(ValueError()))
    assert dispatch(app, "envfrom") == Reject(text="fallback")


def test_mapper_returning_none_does_not_fall_through_to_a_general_mapper() -> None:
    app = App("t")
    app.on_error(Exception)(lambda exc, ctx: Reject(text="general"))
    app.on_error(ValueError)(lambda exc, ctx: None)
    app.add_handler("envfrom", raising(ValueError()))
    assert dispatch(app, "envfrom") == TempFail()


def test_mapper_raising_gives_the_fallback(log: Logs) -> None:
    app = App("t", fallback=Reject(text="fallback"))

    @app.on_error(ValueError)
    def broken(exc: ValueError, ctx: Context) -> Reject:
        raise RuntimeError("mapper bug")

    app.add_handler("envfrom", raising(ValueError()))
    ctx = make_ctx()
    assert run(app.dispatch("envfrom", EVENTS["envfrom"], ctx)) == Reject(text="fallback")
    assert len(log.named("error_mapper_failed")) == 1
    assert isinstance(log.named("error_mapper_failed")[0]["exc_info"], RuntimeError)


def test_async_mapper_raising_gives_the_fallback() -> None:
    app = App("t")

    @app.on_error(ValueError)
    async def broken(exc: ValueError, ctx: Context) -> Reject:
        raise RuntimeError("mapper bug")

    app.add_handler("envfrom", raising(ValueError()))
    assert dispatch(app, "envfrom") == TempFail()


@pytest.mark.parametrize(
    ("name", "mapped"),
    [
        ("helo", Discard()),
        ("connect", Discard()),
        ("envfrom", Skip()),
        ("eom", Skip()),
        ("envfrom", "reject"),
        ("envfrom", AddHeader(name="X", value="y")),
    ],
    ids=repr,
)
def test_mapper_returning_an_invalid_reply_gives_the_fallback(name: str, mapped: object) -> None:
    app = App("t", fallback=Reject(text="fallback"))
    app.on_error(ValueError)(lambda exc, ctx: mapped)
    app.add_handler(name, raising(ValueError()))
    assert dispatch(app, name) == Reject(text="fallback")


@pytest.mark.parametrize("mapped", [Discard(), Skip()], ids=repr)
def test_mapper_reply_valid_for_the_stage_is_used(mapped: Verdict) -> None:
    app = App("t")
    app.on_error(ValueError)(lambda exc, ctx: mapped)
    app.add_handler("body", raising(ValueError()))
    assert dispatch(app, "body") == mapped


def test_mapper_is_called_for_a_non_reply_too() -> None:
    # A handler returning a non-reply fails with TypeError, which mappers see.
    app = App("t")
    app.on_error(TypeError)(lambda exc, ctx: Reject(text="type error"))
    app.add_handler("envfrom", returning("ok"))
    assert dispatch(app, "envfrom") == Reject(text="type error")


# --- what the log entry carries ---------------------------------------------------------------


def test_failure_is_logged_through_the_connection_logger(log: Logs) -> None:
    app = App("t")
    app.add_handler("envfrom", failing)
    ctx = make_ctx()
    assert run(app.dispatch("envfrom", EVENTS["envfrom"], ctx)) == TempFail()
    failure = log.named("handler_failed")[0]
    assert failure["conn_id"] == "1"
    assert failure["peer"] == "test"
    assert failure["timeout"] == 25.0
    assert str(failure["exc_info"]) == "handler bug"


def test_success_logs_nothing(log: Logs) -> None:
    app = App("t")
    app.add_handler("helo", returning(Accept()))
    app.add_handler("close", lambda event: None)
    assert dispatch(app, "helo") == Accept()
    assert dispatch(app, "close") is None
    assert log.records == []
