"""Ask a slow external service about each message, without letting the MTA time out.

The check runs asynchronously at end of message; while it runs, milterapp sends progress
packets every ``progress_interval`` seconds, which restart the MTA's timer. If the service
fails or takes longer than the handler's deadline, the message is tempfailed, not accepted.
Run: ``python examples/slow_check.py [--spec SPEC]``.
"""

import asyncio

from milterapp import App, Context, EndOfMessage, Reject

app = App("slow-check", keep_message=True, progress_interval=5.0)


async def external_verdict(body: bytes) -> bool:
    """Stand-in for a call to a scanning service over the network."""
    await asyncio.sleep(0.5)
    return b"EICAR" not in body


@app.on("eom", timeout=240.0)
async def scan(event: EndOfMessage, ctx: Context) -> Reject | None:
    if not await external_verdict(ctx.message.body_bytes()):
        return Reject(code=550, xcode="5.7.1", text="message refused by the content scanner")
    ctx.add_header("X-Scanned", "clean")
    return None


if __name__ == "__main__":
    app.run()
