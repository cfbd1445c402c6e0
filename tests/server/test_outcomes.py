"""The administrator's log: one ``message`` line per message, one ``connection_closed`` line
per connection, debug ``event`` lines, and a handler's failure named as such."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import structlog

from milterapp import Accept, App, Context, Reject, TempFail
from milterapp.events import Abort, EnvFrom, EnvRcpt
from milterapp.server.logsetup import configure_logging
from milterapp.testing import MilterTestClient
from tests.server.support import (
    connect,
    message_events,
    run,
    running_server,
    send,
    start_session,
    until,
)

HAM = b"From: a@example.org\r\nSubject: hi\r\n\r\nhello\r\n"


def lines(logs: list[dict[str, Any]], event: str) -> list[dict[str, Any]]:
    return [entry for entry in logs if entry["event"] == event]


def guard() -> App:
    app = App("guard", keep_message=True)

    @app.on("envfrom")
    def sender(event: EnvFrom) -> Reject | None:
        if event.address == "spam@example.com":
            return Reject(code=550, xcode="5.7.1", text="go away")
        return None

    @app.on("envrcpt")
    def recipient(event: EnvRcpt) -> TempFail | None:
        return TempFail() if event.address.startswith("full@") else None

    @app.on("eom")
    def stamp(event: object, ctx: Context) -> Accept:
        ctx.add_header("X-Checked", "yes")
        ctx.quarantine("look at it")
        return Accept()

    return app


def test_each_message_has_one_line_with_its_outcome() -> None:
    with structlog.testing.capture_logs() as logs, MilterTestClient(guard()) as client:
        client.send_message(HAM, recipients=["bob@example.net", "full@example.net"])
        client.send_message(HAM, sender="spam@example.com")
    done = lines(logs, "message")
    assert len(done) == 2
    delivered, refused = done
    assert delivered["verdict"] == "accept"
    assert delivered["stage"] == "eom"
    assert delivered["sender"] == "sender@example.org"
    assert (delivered["recipients"], delivered["refused"]) == (1, 1)
    assert delivered["modifications"] == "add_header:1,quarantine:1"
    assert delivered["queue_id"]
    assert delivered["body_bytes"] == len(b"hello\r\n")
    assert delivered["handler_ms"] >= 0
    assert delivered["duration_ms"] >= delivered["handler_ms"]
    assert refused["verdict"] == "reject"
    assert refused["stage"] == "envfrom"
    assert (refused["code"], refused["xcode"]) == (550, "5.7.1")
    assert refused["sender"] == "spam@example.com"


def test_a_message_that_ends_without_a_verdict_is_logged_as_an_abort() -> None:
    async def body() -> list[dict[str, Any]]:
        with structlog.testing.capture_logs() as logs:
            async with running_server(App("quiet")) as server:
                client = await connect(server)
                await start_session(client)
                for event in message_events(recipients=["b@example.net"])[:3]:
                    await send(client, event)
                await client.send(Abort())
                await client.close()  # (QUIT)
                await until(lambda: bool(lines(logs, "connection_closed")))
        return logs

    logs = run(body())
    (done,) = lines(logs, "message")
    assert (done["verdict"], done["stage"], done["recipients"]) == ("abort", "envrcpt", 1)
    assert done["sender"] == "alice@example.org"


def test_a_message_open_when_the_connection_closes_is_logged_as_an_abort() -> None:
    """The MTA went away in the middle of a message (no abort first): the message still
    gets its line, and the time the milter waited meanwhile is not counted as its own."""

    async def body() -> list[dict[str, Any]]:
        with structlog.testing.capture_logs() as logs:
            async with running_server(guard()) as server:  # (it answers MAIL and RCPT)
                client = await connect(server)
                await start_session(client)
                for event in message_events(recipients=["b@example.net"])[:3]:
                    await send(client, event)
                await asyncio.sleep(0.2)  # (the MTA's silence, which handler_ms must leave out)
                await client.close(quit=False)  # the socket closed: no abort, no QUIT
                await until(lambda: bool(lines(logs, "connection_closed")))
        return logs

    logs = run(body())
    (done,) = lines(logs, "message")
    assert (done["verdict"], done["stage"], done["recipients"]) == ("abort", "envrcpt", 1)
    assert done["handler_ms"] < 200 <= done["duration_ms"]


def test_the_connection_line_counts_its_messages() -> None:
    with structlog.testing.capture_logs() as logs, MilterTestClient(guard()) as client:
        client.send_message(HAM)
        client.send_message(HAM)
    (closed,) = lines(logs, "connection_closed")
    assert closed["messages"] == 2
    assert closed["duration_ms"] >= 0


def test_debug_lines_name_each_event_and_its_reply() -> None:
    with structlog.testing.capture_logs() as logs, MilterTestClient(guard()) as client:
        client.send_message(HAM, sender="spam@example.com")
    events = {entry["stage"]: entry for entry in lines(logs, "event")}
    assert events["envfrom"]["replies"] == "y"  # SMFIR_REPLYCODE
    assert events["envfrom"]["ms"] >= 0


def test_nothing_is_kept_for_the_log_when_it_would_not_be_printed(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure_logging("text", "WARNING")
    seen: list[float] = []
    app = guard()

    @app.on("close")
    def close(event: object, ctx: Context) -> None:
        seen.append(ctx.message.handler_seconds)

    with MilterTestClient(app) as client:
        client.send_message(HAM)
    assert "event=message" not in capsys.readouterr().err
    assert seen == [0.0]  # not even timed


def test_a_failing_handler_in_a_test_is_logged_as_the_handlers_failure() -> None:
    app = App("broken")

    @app.on("eom")
    def explode(event: object) -> None:
        raise RuntimeError("my bug")

    with (
        structlog.testing.capture_logs() as logs,
        MilterTestClient(app) as client,
        pytest.raises(RuntimeError, match="my bug"),
    ):
        client.send_message(HAM)
    (failed,) = lines(logs, "handler_failed")
    assert failed["handler"].endswith("explode")
    assert failed["stage"] == "eom"
    assert lines(logs, "connection_failed") == []
