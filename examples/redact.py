"""Replace card numbers in message bodies before they are delivered.

Run: ``python examples/redact.py [--spec SPEC]``.
"""

import re

from milterapp import App, Context, EndOfMessage

# 13 to 16 digits, single spaces or dashes allowed between them (not after the last one).
CARD = re.compile(rb"\b\d(?:[ -]?\d){12,15}\b")

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
