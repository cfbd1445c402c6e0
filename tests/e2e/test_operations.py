"""End to end: the milter's ``message`` lines against the real Postfix's own log.

Messages with a mix of verdicts go through Postfix; the milter logs exactly one ``message``
line per message, and the queue ids in those lines are the ones Postfix logged for them, with
the verdict each one got.
"""

from __future__ import annotations

import re
import smtplib
from contextlib import closing, suppress
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
from tests.server.test_metrics import scrape

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


def send(port: int, sender: str, recipients: list[str], data: bytes) -> None:
    # Refused or not is the milter's verdict, checked in the logs.
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as smtp, suppress(smtplib.SMTPException):
        smtp.sendmail(sender, recipients, data)


def test_postfix_each_message_has_one_line_with_postfixs_queue_id(mta: Mta) -> None:
    box = f"ops-{mta.transport}@example.org"
    full = f"full-{mta.transport}@example.org"
    later = f"later-{mta.transport}@example.org"
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
        port = mta.postfix.smtp_port
        send(port, SENDER, [box], message("plain"))
        send(port, SENDER, [box, full], message("one refused"))
        send(port, SPAMMER, [box], message("spam"))
        send(port, SENDER, [box], message("please discard"))
        send(port, SENDER, [later], message("tempfail at the end"))
        mta.postfix.wait_for_mail(box.partition("@")[0], count=2)

        def milter_lines() -> list[dict[str, Any]]:
            return [entry for entry in logs if entry["event"] == "message"]

        lines = poll(milter_lines, 5, 30, "five message lines", mta.postfix.log)
        scraped = scrape(endpoint.port)
    assert len(lines) == 5
    verdicts = sorted((line["verdict"], line["stage"]) for line in lines)
    assert verdicts == [
        ("accept", "eom"),
        ("accept", "eom"),
        ("discard", "header"),
        ("reject", "envfrom"),
        ("tempfail", "eom"),
    ]
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
    counted = {
        labels: value
        for (name, labels), value in scraped.items()
        if name == "milterapp_messages_total"
    }
    assert counted == {
        (("stage", "eom"), ("verdict", "accept")): 2,
        (("stage", "header"), ("verdict", "discard")): 1,
        (("stage", "envfrom"), ("verdict", "reject")): 1,
        (("stage", "eom"), ("verdict", "tempfail")): 1,
    }
    assert scraped["milterapp_recipients_refused_total", ()] == 1
