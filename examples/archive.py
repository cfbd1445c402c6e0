"""Send a copy of every accepted message to an archive mailbox.

Run: ``python examples/archive.py [--spec SPEC]``.
"""

from milterapp import App, Context, EndOfMessage

ARCHIVE = "archive@example.org"

app = App("archive")


@app.on("eom")
def archive(event: EndOfMessage, ctx: Context) -> None:
    # NOTIFY=NEVER: the archive copy never produces delivery status notifications.
    ctx.add_recipient(f"<{ARCHIVE}>", "NOTIFY=NEVER")


if __name__ == "__main__":
    app.run()
