"""Replace card numbers in message bodies before they are delivered.

Run: ``python examples/redact.py [--spec SPEC]``.
"""

import re

from milterapp import App, Context, EndOfMessage

CARD = re.compile(rb"\b(?:\d[ -]?){13,16}\b")

app = App("redact", keep_message=True)


@app.on("eom")
def redact(event: EndOfMessage, ctx: Context) -> None:
    body = ctx.message.body_bytes()
    redacted, count = CARD.subn(b"[number removed]", body)
    if count:
        ctx.replace_body(redacted)
        ctx.add_header("X-Redacted", f"{count} card number(s)")


if __name__ == "__main__":
    app.run()
