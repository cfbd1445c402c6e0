"""Hold suspicious messages in the MTA's quarantine (Postfix: the hold queue).

A message is suspicious here when its From: domain differs from the envelope sender's and it
asks for a password. An administrator releases it with ``postsuper -H``.
Run: ``python examples/quarantine.py [--spec SPEC]``.
"""

from dataclasses import dataclass
from email.utils import parseaddr

from milterapp import App, Body, Context, EndOfMessage, Header

WORD = b"password"


@dataclass
class Suspicion:
    """What one message has shown so far (a fresh one for every message)."""

    score: int = 0
    asked_for_password: bool = False
    tail: bytes = b""  # the end of the last body chunk: the word may span two chunks


app = App("quarantine", message_state=Suspicion)


@app.on("header")
def from_header(event: Header, ctx: Context[Suspicion]) -> None:
    if event.name.lower() == "from":
        domain = parseaddr(event.value)[1].rpartition("@")[2].lower()
        if domain and domain != ctx.message.sender.domain:
            ctx.message.state.score += 1


@app.on("body")
def body(event: Body, ctx: Context[Suspicion]) -> None:
    state = ctx.message.state
    text = state.tail + event.chunk.lower()
    if not state.asked_for_password and WORD in text:
        state.asked_for_password = True
        state.score += 1
    state.tail = text[-(len(WORD) - 1) :]


@app.on("eom")
def decide(event: EndOfMessage, ctx: Context[Suspicion]) -> None:
    if ctx.message.state.score >= 2:
        ctx.quarantine("forged sender asking for a password")


if __name__ == "__main__":
    app.run()
