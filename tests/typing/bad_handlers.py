"""Mistyped handlers: mypy must report every one of them.

Each misuse carries a ``# type: ignore[...]`` with the code of the error mypy reports for
it, on the line it reports (the decorator's). tests/typing/test_typing.py runs mypy with
``--warn-unused-ignores``: an ignore that silences nothing is itself an error, so a misuse
that mypy stopped catching fails the check.

Not caught statically (so not listed here): an unknown event name (``app.on`` falls back to
an overload taking any str; App.on raises SetupError at run time), handlers passed to
``add_handler`` and the signature of ``on_error`` mappers (both typed ``Callable[..., Any]``).
"""

from __future__ import annotations

from dataclasses import dataclass

from milterapp.app import App
from milterapp.context import Context
from milterapp.events import EndOfMessage, EnvFrom, EnvRcpt, Header, Helo, Quit
from milterapp.replies import AddHeader, Reject

app = App("typing-bad")


# A HELO handler registered for MAIL FROM.
@app.on("envfrom")  # type: ignore[type-var]
async def helo_for_envfrom(event: Helo, ctx: Context) -> None:
    return None


# A handler that returns a string instead of a reply.
@app.on("envfrom")  # type: ignore[type-var]
def returns_str(event: EnvFrom) -> str:
    return "reject"


# An RCPT TO handler registered under the alias of MAIL FROM.
@app.on("envelope-from")  # type: ignore[type-var]
async def envrcpt_for_envelope_from(event: EnvRcpt, ctx: Context) -> Reject | None:
    return None


# A modification returned instead of queued with ctx.add_header().
@app.on("eom")  # type: ignore[type-var]
async def returns_modification(event: EndOfMessage, ctx: Context) -> AddHeader:
    return AddHeader(name="X-Test", value="1")


# A close handler that forgets two of the three close events.
@app.on("close")  # type: ignore[type-var]
def quit_only(event: Quit) -> None:
    return None


# The same mistake under the alias.
@app.on("finished")  # type: ignore[type-var]
async def quit_only_alias(event: Quit, ctx: Context) -> None:
    return None


# Arguments in the wrong order.
@app.on("helo")  # type: ignore[type-var]
def ctx_first(ctx: Context, event: Helo) -> None:
    return None


# An async handler returning an int.
@app.on("header")  # type: ignore[type-var]
async def returns_int(event: Header) -> int:
    return 1


# A handler taking a third argument.
@app.on("helo")  # type: ignore[type-var]
def three_args(event: Helo, ctx: Context, extra: int) -> None:
    return None


# on_error needs an exception class.
@app.on_error(42)  # type: ignore[arg-type]
def not_an_exception_class(exc: Exception, ctx: Context) -> None:
    return None


# Lifecycle hooks take no argument.
@app.on_startup  # type: ignore[type-var]
async def hook_with_argument(app: App) -> None:
    return None


# The decorator keeps the handler's own signature: calling it wrongly is still caught.
@app.on("envfrom")
def well_typed(event: EnvFrom, ctx: Context) -> Reject | None:
    return None


def call_it_wrongly(ctx: Context) -> None:
    well_typed(Helo(name="x"), ctx)  # type: ignore[arg-type]


@dataclass
class Scores:
    score: int = 0


typed = App("typing-state", message_state=Scores)


# A typo on the typed per-message state.
@typed.on("eom")
def misspelt_state(event: EndOfMessage, ctx: Context[Scores]) -> None:
    ctx.message.state.scroe += 1  # type: ignore[attr-defined]


# The state has the declared type, not any: a str is not an int.
@typed.on("eom")
def wrong_type(event: EndOfMessage, ctx: Context[Scores]) -> None:
    ctx.message.state.score = "high"  # type: ignore[assignment]
