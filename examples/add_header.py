"""Add a header to every message that passes through.

Run: ``python examples/add_header.py [--spec SPEC]``, then in Postfix's main.cf:
``smtpd_milters = inet:127.0.0.1:10025``.
"""

from milterapp import App, Context, EndOfMessage

app = App("add-header")


@app.on("eom")
def stamp(event: EndOfMessage, ctx: Context) -> None:
    ctx.add_header("X-Filtered-By", f"{app.name} on {ctx.macros.get('j', 'this host')}")


if __name__ == "__main__":
    app.run()
