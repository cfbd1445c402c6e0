"""``milterapp demo``: a real milter on a temporary unix socket, three messages through it.

The milter is an ordinary App served by the real server; the messages go through the testing
kit's MTA client, which speaks to the socket as Postfix would. Each message's fate is printed:
what the milter answered at each stage, the verdict, and what the MTA would deliver.
"""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Callable
from pathlib import Path

from milterapp.app import App
from milterapp.context import Context
from milterapp.events import EndOfMessage, EnvFrom, Header
from milterapp.replies import Reject
from milterapp.server.server import MilterServer
from milterapp.testing.client import AsyncMilterTestClient, MessageResult
from milterapp.testing.report import describe_result

__all__ = ["build_demo_app", "run_demo"]

SAMPLES = [
    (
        "alice@example.org",
        ["bob@example.net"],
        b"From: Alice <alice@example.org>\r\nTo: bob@example.net\r\nSubject: Lunch?\r\n\r\n"
        b"Are you free at noon?\r\n",
    ),
    (
        "promo@spam.example",
        ["bob@example.net"],
        b"From: promo@spam.example\r\nTo: bob@example.net\r\nSubject: You won!\r\n\r\n"
        b"Claim your prize.\r\n",
    ),
    (
        "carol@example.org",
        ["bob@example.net"],
        b"From: carol@example.org\r\nTo: bob@example.net\r\nSubject: card number\r\n\r\n"
        b"My card is 4111 1111 1111 1111, please charge it.\r\n",
    ),
]


def build_demo_app() -> App:
    """The demo milter: refuse spam.example, redact card numbers, stamp everything."""
    app = App("demo", keep_message=True, no_reply={"header"})

    @app.on("envfrom")
    def refuse_spam(event: EnvFrom) -> Reject | None:
        if event.domain == "spam.example":
            return Reject(code=550, xcode="5.7.1", text=f"mail from {event.domain} is refused")
        return None

    @app.on("header")
    def remember_subject(event: Header, ctx: Context) -> None:
        if event.name.lower() == "subject":
            ctx.message.subject = event.value

    @app.on("eom")
    def stamp_and_redact(event: EndOfMessage, ctx: Context) -> None:
        body = ctx.message.body_bytes()
        if b"4111 1111 1111 1111" in body:
            ctx.replace_body(body.replace(b"4111 1111 1111 1111", b"[card number removed]"))
            ctx.change_header("Subject", f"[redacted] {getattr(ctx.message, 'subject', '')}")
        ctx.add_header("X-Milterapp-Demo", "checked")

    return app


def _report(
    write: Callable[[str], object], sender: str, data: bytes, result: MessageResult
) -> None:
    write(f"\n=== MAIL FROM:<{sender}>")
    for line in describe_result(result, data, sender=sender):
        write(f"  {line}")


async def _demo(write: Callable[[str], object]) -> int:
    app = build_demo_app()
    with tempfile.TemporaryDirectory(prefix="milterapp-demo-") as directory:
        spec = f"unix:{Path(directory) / 'demo.sock'}"
        server = MilterServer(app, spec=spec)
        await server.start()
        write(f"milterapp demo: a milter listens on {spec}; an MTA like Postfix sends 3 messages")
        try:
            async with AsyncMilterTestClient(target=spec) as client:
                for sender, recipients, data in SAMPLES:
                    result = await client.send_message(data, sender=sender, recipients=recipients)
                    _report(write, sender, data, result)
        finally:
            server.request_stop()
            await server.close()
    write("\nThe milter accepted and stamped the first message, refused the second at MAIL FROM,")
    write("and rewrote the third (subject tagged, card number removed) before accepting it.")
    return 0


def run_demo(write: Callable[[str], object] = print) -> int:
    """Run the demo; return the exit status (0)."""
    return asyncio.run(_demo(write))
