"""Correctly typed handlers for every event name and alias: mypy --strict must accept them all.

Checked by tests/typing/test_typing.py (not a test module itself). It is also imported there,
to show that what type-checks also registers at run time.
"""

from __future__ import annotations

from collections.abc import Awaitable
from dataclasses import dataclass, field

from milterapp.app import App
from milterapp.context import Context
from milterapp.events import (
    Abort,
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
    QuitNoClose,
    Unknown,
)
from milterapp.handlers import CloseEvent
from milterapp.replies import Accept, Continue, Discard, Reject, Shutdown, Skip, TempFail
from milterapp.server import Servable

app = App("typing-good")


# --- canonical names, (event, ctx), async ---------------------------------------------------


@app.on("negotiate")
async def on_negotiate(event: Negotiate, ctx: Context) -> None:
    ctx.state["version"] = event.version


@app.on("open")
async def on_open(event: ConnectionOpened, ctx: Context) -> None:
    ctx.state["peer"] = event.peer


@app.on("connect")
async def on_connect(event: Connect, ctx: Context) -> Accept | Reject | None:
    if event.hostname == "localhost":
        return Accept()
    return None


@app.on("helo")
async def on_helo(event: Helo, ctx: Context) -> TempFail | None:
    return TempFail() if not event.name else None


@app.on("envfrom")
async def on_envfrom(event: EnvFrom, ctx: Context) -> Reject | None:
    return Reject(text="no null sender") if event.address == "" else None


@app.on("envrcpt")
async def on_envrcpt(event: EnvRcpt, ctx: Context) -> Reject | TempFail | Continue:
    return Continue()


@app.on("data")
async def on_data(event: Data, ctx: Context) -> None:
    return None


@app.on("unknown")
async def on_unknown(event: Unknown, ctx: Context) -> Reject:
    return Reject(text=f"unknown command {event.line}")


@app.on("header")
async def on_header(event: Header, ctx: Context) -> Discard | None:
    return Discard() if event.name.lower() == "x-discard" else None


@app.on("eoh")
async def on_eoh(event: EndOfHeaders, ctx: Context) -> None:
    return None


@app.on("body")
async def on_body(event: Body, ctx: Context) -> Skip | None:
    return Skip() if len(event.chunk) > 1000 else None


@app.on("eom")
async def on_eom(event: EndOfMessage, ctx: Context) -> Accept | Shutdown | None:
    ctx.add_header("X-Checked", "yes")
    return None


@app.on("abort")
async def on_abort(event: Abort, ctx: Context) -> None:
    ctx.state.pop("score", None)


@app.on("close")
async def on_close(event: Quit | QuitNoClose | ConnectionClosed, ctx: Context) -> None:
    ctx.state.clear()


# --- every alias, sync, (event) only --------------------------------------------------------


@app.on("connection-established")
def opened(event: ConnectionOpened) -> None:
    return None


@app.on("envelope-from")
def envelope_from(event: EnvFrom) -> Reject | None:
    return None


@app.on("envelope-recipient")
def envelope_recipient(event: EnvRcpt) -> TempFail | None:
    return None


@app.on("end-of-header")
def end_of_header(event: EndOfHeaders) -> None:
    return None


@app.on("end-of-headers")
def end_of_headers(event: EndOfHeaders) -> Continue:
    return Continue()


@app.on("end-of-message")
def end_of_message(event: EndOfMessage) -> Accept:
    return Accept()


@app.on("finished")
def finished(event: CloseEvent) -> None:
    return None


# --- sync with ctx, plain functions returning awaitables, defaults, timeouts ----------------


@app.on("helo", timeout=2.5)
def helo_sync(event: Helo, ctx: Context) -> Reject | None:
    ctx.state["helo"] = event.name
    return None


async def _later(event: EnvRcpt) -> Reject | None:
    return None


@app.on("envrcpt")
def returns_awaitable(event: EnvRcpt) -> Awaitable[Reject | None]:
    return _later(event)


@app.on("envfrom")
def with_default(event: EnvFrom, ctx: Context | None = None) -> None:
    return None


# --- wider parameter types are fine (contravariance) ---------------------------------------


@app.on("connect")
@app.on("helo")
@app.on("envfrom")
@app.on("envrcpt")
@app.on("header")
@app.on("eom")
async def any_event(event: Event, ctx: Context) -> None:
    ctx.log.info("event", kind=type(event).__name__)


@app.on("close")
def close_base(event: Event) -> None:
    return None


@app.on("finished")
async def close_union(event: Quit | QuitNoClose | ConnectionClosed) -> None:
    return None


# --- the decorator returns the function unchanged --------------------------------------------


# If the decorator erased the handler's type (to Any), --strict would flag returning Any here.
async def still_callable() -> Reject | None:
    return await on_envfrom(
        EnvFrom(address="a@example.org"), Context(app_name="t", conn_id="1", peer="p", macros={})
    )


# --- add_handler, on_error, hooks -------------------------------------------------------------


def plain(event: Helo) -> None:
    return None


app.add_handler("helo", plain)
app.add_handler("envelope-from", with_default, timeout=1)


class DNSFailure(Exception):
    pass


@app.on_error(DNSFailure)
async def dns_failed(exc: DNSFailure, ctx: Context) -> TempFail:
    return TempFail(text="DNS lookup failed")


@app.on_error(ValueError)
def bad_value(exc: ValueError, ctx: Context) -> Reject | None:
    return None


@app.on_startup
async def start() -> None:
    return None


@app.on_shutdown
def stop() -> None:
    return None


NAMES_REGISTERED = (
    "negotiate",
    "open",
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

# The server serves anything shaped like an App; an App is one (checked by mypy, here).
SERVED: Servable = app


# --- typed state ------------------------------------------------------------------------------


@dataclass
class Scores:
    """Per-message state: a fresh instance for every message."""

    score: int = 0
    reasons: list[str] = field(default_factory=list)


@dataclass
class Session:
    """Per-connection state."""

    messages: int = 0


typed = App("typing-state", message_state=Scores, connection_state=Session)


@typed.on("header")
def score_header(event: Header, ctx: Context[Scores, Session]) -> None:
    if event.name.lower() == "x-spam":
        ctx.message.state.score += 5
        ctx.message.state.reasons.append("x-spam")


@typed.on("eom")
def decide_on_score(event: EndOfMessage, ctx: Context[Scores]) -> Reject | None:
    # The facts the context always holds are typed without None: no assert needed.
    ctx.add_header("X-Client", f"{ctx.helo} [{ctx.client.address}]")
    if ctx.message.state.score >= 5:
        return Reject(text=", ".join(ctx.message.state.reasons))
    return None


@typed.on("close")
def count_messages(event: CloseEvent, ctx: Context[Scores, Session]) -> None:
    ctx.state.messages += 1


# Without declared state, both are dicts.
@app.on("eom")
def untyped_state(event: EndOfMessage, ctx: Context) -> None:
    ctx.state["seen"] = ctx.state.get("seen", 0) + 1
    ctx.message.state["score"] = 1
