"""End to end: what the context promises, through the real Postfix and the real Sendmail.

The script of issue 14, written as a newcomer would: no ``connect`` or ``envfrom`` handler,
and end of message reads the client, the HELO name and the sender. It used to defer every
message on both MTAs (``ctx.client`` was None: the connect event was never asked for). And
``ctx.message.recipients`` in an ``envrcpt`` handler holds the recipients accepted before the
one being checked, so a limit of 3 lets exactly 3 through.
"""

from __future__ import annotations

import smtplib
from dataclasses import dataclass

from milterapp import App, Context, EndOfMessage, EnvRcpt, TempFail
from tests.e2e.common import SENDER, message
from tests.e2e.conftest import Mta
from tests.e2e.sendmail import SendmailMta

HELO_NAME = "client.test.example"


def obvious_script() -> App:
    """The natural script: a Reject at nothing, just facts read at end of message."""
    app = App("obvious")

    @app.on("eom")
    def stamp(event: EndOfMessage, ctx: Context) -> None:
        ctx.add_header("X-Client", f"{ctx.helo} [{ctx.client.address}]")
        ctx.add_header("X-Sender", ctx.message.sender.address)
        ctx.add_header("X-Recipients", str(len(ctx.message.recipients)))

    return app


@dataclass
class Counted:
    """How many recipients the handler saw accepted before each one."""

    before: str = ""


def at_most_three(**options: object) -> App:
    app = App("at-most-three", message_state=Counted, **options)

    @app.on("envrcpt")
    def limit(event: EnvRcpt, ctx: Context[Counted]) -> TempFail | None:
        ctx.message.state.before += str(len(ctx.message.recipients))
        if len(ctx.message.recipients) >= 3:
            return TempFail(code=452, xcode="4.5.3", text="too many recipients")
        return None

    @app.on("eom")
    def count(event: EndOfMessage, ctx: Context[Counted]) -> None:
        ctx.add_header("X-Counted", ",".join(r.address for r in ctx.message.recipients))
        ctx.add_header("X-Before", ctx.message.state.before)

    return app


def send(port: int, recipients: list[str], data: bytes) -> dict[str, tuple[int, bytes]]:
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as smtp:
        smtp.ehlo(HELO_NAME)
        return smtp.sendmail(SENDER, recipients, data)


# --- Postfix ---------------------------------------------------------------------------------


def test_postfix_delivers_what_the_obvious_script_stamps(mta: Mta) -> None:
    box = f"obvious-{mta.transport}"
    with mta.milter(obvious_script()):
        refused = send(mta.postfix.smtp_port, [f"{box}@example.org"], message("obvious"))
    assert refused == {}
    [delivered] = mta.postfix.wait_for_mail(box)
    assert delivered["X-Client"] == f"{HELO_NAME} [127.0.0.1]"
    assert delivered["X-Sender"] == SENDER
    assert delivered["X-Recipients"] == "1"


def test_postfix_a_limit_of_three_recipients_lets_three_through(mta: Mta) -> None:
    boxes = [f"counted{n}-{mta.transport}" for n in range(1, 5)]
    with mta.milter(at_most_three()):
        refused = send(mta.postfix.smtp_port, [f"{b}@example.org" for b in boxes], message("3"))
    assert list(refused) == [f"{boxes[3]}@example.org"]
    assert refused[f"{boxes[3]}@example.org"][0] == 452
    for box in boxes[:3]:
        [delivered] = mta.postfix.wait_for_mail(box)
        assert delivered["X-Counted"] == ",".join(f"{b}@example.org" for b in boxes[:3])
        assert delivered["X-Before"] == "0123"


def test_postfix_recipients_it_refused_itself_are_not_counted(mta: Mta) -> None:
    # rejected_recipients=True: Postfix also shows the unknown user it refused, marked so.
    boxes = [f"counted{n}-{mta.transport}" for n in (1, 2)]
    unknown = f"nobody-{mta.transport}@example.org"
    app = App("rcpt-rej", rejected_recipients=True)
    seen: list[list[str]] = []

    @app.on("envrcpt")
    def look(event: EnvRcpt) -> None:
        return None

    @app.on("eom")
    def count(event: EndOfMessage, ctx: Context) -> None:
        seen.append([r.address for r in ctx.message.recipients])

    recipients = [f"{boxes[0]}@example.org", unknown, f"{boxes[1]}@example.org"]
    with mta.milter(app):
        refused = send(mta.postfix.smtp_port, recipients, message("rcpt-rej"))
    assert list(refused) == [unknown]
    mta.postfix.wait_for_mail(boxes[1])
    assert seen == [[f"{boxes[0]}@example.org", f"{boxes[1]}@example.org"]]


# --- Sendmail --------------------------------------------------------------------------------


def test_sendmail_delivers_what_the_obvious_script_stamps(sendmail_mta: SendmailMta) -> None:
    recipient = f"obvious-{sendmail_mta.transport}@example.org"
    with sendmail_mta.milter(obvious_script()):
        refused = send(sendmail_mta.smtp_port, [recipient], message("obvious"))
    assert refused == {}
    [delivered] = sendmail_mta.sendmail.wait_for_mail(recipient)
    assert delivered["X-Client"] == f"{HELO_NAME} [127.0.0.1]"
    assert delivered["X-Sender"] == SENDER
    assert delivered["X-Recipients"] == "1"


def test_sendmail_a_limit_of_three_recipients_lets_three_through(
    sendmail_mta: SendmailMta,
) -> None:
    recipients = [f"counted{n}-{sendmail_mta.transport}@example.org" for n in range(1, 5)]
    with sendmail_mta.milter(at_most_three()):
        refused = send(sendmail_mta.smtp_port, recipients, message("3"))
    assert list(refused) == [recipients[3]]
    assert refused[recipients[3]][0] == 452
    [delivery] = sendmail_mta.sendmail.wait_for_deliveries(recipients[0])
    assert sorted(delivery.recipients) == sorted(recipients[:3])
    delivered = delivery.message()
    assert delivered["X-Counted"] == ",".join(recipients[:3])
    assert delivered["X-Before"] == "0123"
