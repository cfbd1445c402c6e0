"""Hold suspicious messages in the MTA's quarantine (Postfix: the hold queue).

A message is suspicious here when its From: domain differs from the envelope sender's and it
asks for a password. An administrator releases it with ``postsuper -H``.
Run: ``python examples/quarantine.py [--spec SPEC]``.
"""

from email.utils import parseaddr

from milterapp import App, Body, Context, EndOfMessage, EnvFrom, Header

app = App("quarantine")


@app.on("envfrom")
def sender(event: EnvFrom, ctx: Context) -> None:
    ctx.message.score = 0


@app.on("header")
def from_header(event: Header, ctx: Context) -> None:
    if event.name.lower() == "from" and ctx.message.sender is not None:
        domain = parseaddr(event.value)[1].rpartition("@")[2].lower()
        if domain and domain != ctx.message.sender.domain:
            ctx.message.score += 1


@app.on("body")
def body(event: Body, ctx: Context) -> None:
    if b"password" in event.chunk.lower():
        ctx.message.score += 1


@app.on("eom")
def decide(event: EndOfMessage, ctx: Context) -> None:
    if getattr(ctx.message, "score", 0) >= 2:
        ctx.quarantine("forged sender asking for a password")


if __name__ == "__main__":
    app.run()
