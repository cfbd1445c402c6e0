"""End to end: the milter's ``message`` lines against the real Postfix's own log.

Messages with a mix of verdicts go through Postfix; the milter logs exactly one ``message``
line per message, and the queue ids in those lines are the ones Postfix logged for them, with
the verdict each one got.
"""

from __future__ import annotations

import json
import re
import smtplib
import textwrap
from contextlib import closing, suppress
from pathlib import Path
from typing import Any

import structlog

from milterapp import (
    App,
    Context,
    Discard,
    EndOfMessage,
    EnvFrom,
    EnvRcpt,
    Header,
    Reject,
    TempFail,
)
from milterapp.server.metrics import Metrics, MetricsEndpoint
from tests.e2e.common import SENDER, message, poll
from tests.e2e.conftest import Mta
from tests.e2e.test_restart import Milter
from tests.server.test_metrics import ACCEPTED, scrape, scrape_until
from tests.server.test_workers import free_port

SPAMMER = "spammer@test.example"
# A queue id on Postfix's smtpd "client=" line: the message got one.
QUEUE_ID = re.compile(r"postfix/smtpd\[\d+\]: ([0-9A-Za-z]+): client=")


def sorting_app() -> App:
    app = App("sorter")

    @app.on("envfrom")
    def sender(event: EnvFrom) -> Reject | None:
        return Reject(code=550, xcode="5.7.1", text="not you") if event.address == SPAMMER else None

    @app.on("envrcpt")
    def recipient(event: EnvRcpt) -> TempFail | None:
        return TempFail(code=452, xcode="4.2.2", text="full") if "full" in event.address else None

    @app.on("header")
    def subject(event: Header) -> Discard | None:
        return Discard() if event.name == "Subject" and "discard" in event.value else None

    @app.on("eom")
    def stamp(event: EndOfMessage, ctx: Context) -> TempFail | None:
        if any("later" in recipient.address for recipient in ctx.message.recipients):
            return TempFail()
        ctx.add_header("X-Sorted", "yes")
        return None

    return app


#: The same app for ``milterapp run`` (the test runs from the repository's root).
SORTING_APP_MODULE = textwrap.dedent(
    f"""
    import sys

    sys.path.insert(0, {str(Path(__file__).parents[2])!r})
    from tests.e2e.test_operations import sorting_app

    app = sorting_app()
    """
)
#: Each verdict's (verdict, stage) once, and the accepted ones twice, as the mix below gives.
MIX_VERDICTS = [
    ("accept", "eom"),
    ("accept", "eom"),
    ("discard", "header"),
    ("reject", "envfrom"),
    ("tempfail", "eom"),
]


def send(port: int, sender: str, recipients: list[str], data: bytes) -> None:
    # Refused or not is the milter's verdict, checked in the logs.
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as smtp, suppress(smtplib.SMTPException):
        smtp.sendmail(sender, recipients, data)


def send_mix(mta: Mta, box: str) -> None:
    """Five messages, one per verdict (two accepted), through Postfix; wait for the two."""
    full = f"full-{mta.transport}@example.org"
    later = f"later-{mta.transport}@example.org"
    port = mta.postfix.smtp_port
    before = len(mta.postfix.mailbox(box.partition("@")[0]))
    send(port, SENDER, [box], message("plain"))
    send(port, SENDER, [box, full], message("one refused"))
    send(port, SPAMMER, [box], message("spam"))
    send(port, SENDER, [box], message("please discard"))
    send(port, SENDER, [later], message("tempfail at the end"))
    mta.postfix.wait_for_mail(box.partition("@")[0], count=before + 2)


def messages_counted(scraped: dict[Any, float]) -> dict[Any, float]:
    return {
        labels: value
        for (name, labels), value in scraped.items()
        if name == "milterapp_messages_total"
    }


MIX_COUNTED = {
    (("stage", "eom"), ("verdict", "accept")): 2,
    (("stage", "header"), ("verdict", "discard")): 1,
    (("stage", "envfrom"), ("verdict", "reject")): 1,
    (("stage", "eom"), ("verdict", "tempfail")): 1,
}


def test_postfix_each_message_has_one_line_with_postfixs_queue_id(mta: Mta) -> None:
    box = f"ops-{mta.transport}@example.org"
    before = set(QUEUE_ID.findall(mta.postfix.log()))
    metrics = Metrics()
    endpoint = MetricsEndpoint(
        "127.0.0.1:0",
        metrics.registry,
        lambda: metrics.accepting,
        before_scrape=metrics.flush_from_any_thread,
    )
    with (
        structlog.testing.capture_logs() as logs,
        mta.milter(sorting_app(), metrics=metrics),
        closing(endpoint),
    ):
        send_mix(mta, box)

        def milter_lines() -> list[dict[str, Any]]:
            return [entry for entry in logs if entry["event"] == "message"]

        lines = poll(milter_lines, 5, 30, "five message lines", mta.postfix.log)
        scraped = scrape(endpoint.port)
    assert len(lines) == 5
    assert sorted((line["verdict"], line["stage"]) for line in lines) == MIX_VERDICTS
    refused = [line for line in lines if line["refused"]]
    assert [(line["recipients"], line["refused"]) for line in refused] == [(1, 1)]
    rejected = next(line for line in lines if line["verdict"] == "reject")
    assert (rejected["code"], rejected["xcode"], rejected["sender"]) == (550, "5.7.1", SPAMMER)
    assert rejected.get("queue_id") is None  # Postfix gives none before a valid RCPT
    # Every other message got a queue id from Postfix, and the milter logged that same one.
    postfix_ids = set(QUEUE_ID.findall(mta.postfix.log())) - before
    milter_ids = {line["queue_id"] for line in lines if line.get("queue_id")}
    assert len(milter_ids) == 4
    assert milter_ids == postfix_ids
    accepted = [line for line in lines if line["verdict"] == "accept"]
    assert [line["modifications"] for line in accepted] == ["add_header:1"] * 2
    # The same five messages in a scrape of the metrics, read by prometheus_client's parser.
    assert messages_counted(scraped) == MIX_COUNTED
    assert scraped["milterapp_recipients_refused_total", ()] == 1


def test_postfix_two_workers_log_each_message_once_and_the_metrics_sum_both(
    mta: Mta, tmp_path: Path
) -> None:
    """``milterapp run --workers 2 --metrics``: JSON lines from both processes, each with
    its pid, one per message with Postfix's queue ids, and one scrape that sums the workers."""
    (tmp_path / "opsapp.py").write_text(SORTING_APP_MODULE)
    box = f"workers-{mta.transport}@example.org"
    before = set(QUEUE_ID.findall(mta.postfix.log()))
    port = free_port()
    metrics = ["--metrics", f"127.0.0.1:{port}", "--log-format", "json"]
    milter = Milter(mta, tmp_path, "opsapp:app", "--workers", "2", *metrics)
    try:
        milter.wait_listening()
        send_mix(mta, box)

        def entries(event: str) -> list[dict[str, Any]]:
            found = [json.loads(line) for line in milter.lines if line.startswith("{")]
            return [entry for entry in found if entry["event"] == event]

        lines = poll(lambda: entries("message"), 5, 30, "five message lines", mta.postfix.log)
        scraped = scrape_until(port, ACCEPTED, 2)
        assert milter.stop() == 0, "".join(milter.lines)
    finally:
        milter.close()
    assert len(lines) == 5
    assert sorted((line["verdict"], line["stage"]) for line in lines) == MIX_VERDICTS
    workers = {entry["pid"] for entry in entries("worker_started")}
    assert len(workers) == 2
    assert {line["pid"] for line in lines} <= workers
    postfix_ids = set(QUEUE_ID.findall(mta.postfix.log())) - before
    assert {line["queue_id"] for line in lines if line.get("queue_id")} == postfix_ids
    assert messages_counted(scraped) == MIX_COUNTED
    assert scraped["milterapp_recipients_refused_total", ()] == 1
