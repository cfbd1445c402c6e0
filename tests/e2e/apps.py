"""The apps of the end-to-end tests, shared by the Postfix and the Sendmail cases.

Each test file serves these to its MTA and asserts what that MTA does with their answers;
where Postfix and Sendmail differ, the difference is in the test, not in the app.
"""

from __future__ import annotations

import asyncio

from milterapp import Context, Discard, EndOfMessage, EnvFrom, EnvRcpt, Reject, TempFail
from milterapp.app import App


def stamping(name: str = "X-Stamped", value: str = "yes") -> App:
    """Adds one header at end of message."""
    app = App("stamp")

    @app.on("eom")
    def stamp(event: EndOfMessage, ctx: Context) -> None:
        ctx.add_header(name, value)

    return app


def inserting() -> App:
    """Inserts ``X-Top`` above every other header (index 0)."""
    app = App("insert")

    @app.on("eom")
    def insert(event: EndOfMessage, ctx: Context) -> None:
        ctx.insert_header(0, "X-Top", "first")

    return app


def replacement_body(size: int) -> bytes:
    """A body of ``size`` bytes in CRLF lines, ending with CRLF."""
    line = b"replaced body line 0123456789 abcdefghijklmnopqrstuvwxyz\r\n"
    body = (line * (size // len(line) + 1))[:size]
    return body[: size - 2] + b"\r\n"


def replacing_body(body: bytes) -> App:
    app = App("replace")

    @app.on("eom")
    def replace(event: EndOfMessage, ctx: Context) -> None:
        ctx.replace_body(body)

    return app


def rerouting(removed: str, added: str) -> App:
    """Deletes recipient ``removed`` and adds ``added``."""
    app = App("recipients")

    @app.on("eom")
    def reroute(event: EndOfMessage, ctx: Context) -> None:
        ctx.delete_recipient(f"<{removed}>")
        ctx.add_recipient(f"<{added}>")

    return app


def changing_sender() -> App:
    app = App("sender")

    @app.on("eom")
    def change(event: EndOfMessage, ctx: Context) -> None:
        ctx.change_sender("<bounces@test.example>")

    return app


def quarantining(reason: str) -> App:
    app = App("quarantine")

    @app.on("eom")
    def hold(event: EndOfMessage, ctx: Context) -> None:
        ctx.quarantine(reason)

    return app


def discarding() -> App:
    app = App("discard")

    @app.on("eom")
    def discard(event: EndOfMessage) -> Discard:
        return Discard()

    return app


def rejecting_spam_senders() -> App:
    """Refuses senders at spam.example with 550 5.7.1 at MAIL."""
    app = App("reject")

    @app.on("envfrom")
    def refuse(event: EnvFrom) -> Reject | None:
        if event.domain == "spam.example":
            return Reject(code=550, xcode="5.7.1", text="sender spam.example refused")
        return None

    return app


def deferring_recipient(deferred: str) -> App:
    """Tempfails recipient ``deferred`` alone (451 4.2.1)."""
    app = App("one-rcpt")

    @app.on("envrcpt")
    def check(event: EnvRcpt) -> TempFail | None:
        if event.address == deferred:
            return TempFail(code=451, xcode="4.2.1", text="mailbox busy, try later")
        return None

    return app


def refusing_with_lines(text: str | list[str]) -> App:
    """Rejects at end of message with a reply of several lines."""
    app = App("multiline")

    @app.on("eom")
    def refuse(event: EndOfMessage) -> Reject:
        return Reject(code=550, xcode="5.7.1", text=text)

    return app


def failing_first() -> App:
    """Raises on the first message; stamps ``X-Second`` on the next."""
    app = App("flaky")
    calls: list[str | None] = []

    @app.on("eom")
    def flaky(event: EndOfMessage, ctx: Context) -> None:
        calls.append(ctx.message.queue_id)
        if len(calls) == 1:
            raise RuntimeError("bug in the first message")
        ctx.add_header("X-Second", "ok")

    return app


def counting(seen: list[tuple[str, str | None]]) -> App:
    """Numbers the messages of a session in ``X-Count``; records (sender, queue id)."""
    app = App("several")

    @app.on("eom")
    def stamp(event: EndOfMessage, ctx: Context) -> None:
        sender = ctx.message.sender.address
        seen.append((sender, ctx.message.queue_id))
        ctx.add_header("X-Count", str(len(seen)))

    @app.on("envfrom")
    def keep(event: EnvFrom) -> None:
        return None

    return app


def slow(seconds: float, progress_interval: float, name: str = "slow") -> App:
    """An async end-of-message handler that works ``seconds``, then adds ``X-Slow``."""
    app = App(name, progress_interval=progress_interval)

    @app.on("eom")
    async def work(event: EndOfMessage, ctx: Context) -> None:
        await asyncio.sleep(seconds)  # the slow work itself, not synchronisation
        ctx.add_header("X-Slow", "done")

    return app


def stamping_queue_id() -> App:
    """Adds ``X-Load`` with the message's queue id."""
    app = App("load")

    @app.on("eom")
    def stamp(event: EndOfMessage, ctx: Context) -> None:
        ctx.add_header("X-Load", ctx.message.queue_id or "none")

    return app
