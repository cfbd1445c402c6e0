"""Shutdown() goes to the MTA only where it honours it; elsewhere TempFail, so nothing is lost.

Postfix (its ``v`` macro says so) answers Shutdown with 421 before the content; up to 3.10 it
drops the message after a shutdown from ``header`` on, and Sendmail treats the reply as a
broken filter (tests/e2e/test_mta_replies.py shows both on the real MTAs).
"""

from __future__ import annotations

import pytest
import structlog.testing

from milterapp import App, EndOfMessage, EnvFrom, Shutdown, TempFail
from milterapp.events import Macros
from tests.server.support import CLIENT, HELO, connect, run, running_server, send, send_message


def shutting_down(stage: str) -> App:
    app = App(f"shutdown-{stage}")
    if stage == "envfrom":

        @app.on("envfrom")
        def at_mail(event: EnvFrom) -> Shutdown:
            return Shutdown()

    else:

        @app.on("eom")
        def at_end(event: EndOfMessage) -> Shutdown:
            return Shutdown()

    return app


@pytest.mark.parametrize(
    ("mta", "stage", "expected"),
    [
        ("Postfix 3.7.11", "envfrom", Shutdown()),
        ("Postfix 3.7.11", "eom", TempFail()),  # 3.7 would drop the message
        ("Postfix 3.10.2", "eom", TempFail()),
        ("Postfix 3.11.0", "eom", Shutdown()),  # 421 from 3.11 on
        ("8.17.1.9", "envfrom", TempFail()),  # Sendmail: a broken filter, F= decides
        (None, "envfrom", TempFail()),  # unknown MTA: fail closed
    ],
)
def test_shutdown_only_where_the_mta_honours_it(
    mta: str | None, stage: str, expected: object
) -> None:
    app = shutting_down(stage)

    async def main() -> object:
        async with running_server(app) as server, await connect(server) as client:
            await client.negotiate()
            await send(client, Macros(stage="C", values={"v": mta} if mta else {"j": "mx"}))
            await send(client, CLIENT)
            await send(client, HELO)
            answer = await send_message(client)
            return answer.verdict

    with structlog.testing.capture_logs() as logs:
        verdict = run(main())
    assert verdict == expected
    replaced = [entry for entry in logs if entry["event"] == "shutdown_replaced"]
    if expected == TempFail():
        assert len(replaced) == 1
        assert replaced[0]["stage"] == stage
        assert replaced[0]["log_level"] == "warning"
    else:
        assert replaced == []
