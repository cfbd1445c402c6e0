"""Refuse one blocked sender at MAIL FROM and stamp every other message.

Run: ``python examples/sender_guard.py [--spec SPEC]`` (default ``inet:10025@[127.0.0.1]``),
then point Postfix at it: ``smtpd_milters = inet:127.0.0.1:10025``.
"""

from milterapp import App, Context, EndOfMessage, EnvFrom, Reject

app = App("sender-guard")

BLOCKED = frozenset({"blocked@example.com"})


@app.on("envfrom")
async def refuse(event: EnvFrom, ctx: Context) -> Reject | None:
    if event.address.lower() in BLOCKED:
        ctx.log.info("sender_blocked", sender=event.address)
        return Reject(code=550, xcode="5.7.1", text="sender blocked")
    return None


@app.on("eom")
def stamp(event: EndOfMessage, ctx: Context) -> None:
    ctx.add_header("X-Checked-By", app.name)


if __name__ == "__main__":
    app.run()
