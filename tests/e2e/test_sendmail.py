"""End to end: milterapp apps behind a real Sendmail 8.17, over inet and over a unix socket.

The same cases as test_postfix.py. Each test serves its own App where the private Sendmail
expects its milter, sends mail with smtplib, and checks what Sendmail replied, relayed to
the SMTP sink (envelope and content), quarantined or discarded. Where Sendmail behaves
differently from Postfix, the test asserts what Sendmail does and says why.
"""

from __future__ import annotations

import concurrent.futures
import smtplib

import pytest

from milterapp import (
    Context,
    EndOfMessage,
    EnvFrom,
)
from milterapp.app import App
from milterapp.events import Connect
from tests.e2e import apps
from tests.e2e.common import SENDER, message
from tests.e2e.sendmail import HOSTNAME, SendmailMta


def send(
    mta: SendmailMta,
    recipients: list[str],
    data: bytes,
    *,
    sender: str = SENDER,
    port: int | None = None,
) -> dict[str, tuple[int, bytes]]:
    with smtplib.SMTP("127.0.0.1", port or mta.smtp_port, timeout=60) as smtp:
        return smtp.sendmail(sender, recipients, data)


def address(mta: SendmailMta, name: str) -> str:
    """A recipient unique to the test and the transport (the sink accepts any)."""
    return f"{name}-{mta.transport}@example.org"


def test_sendmail_header_added(sendmail_mta: SendmailMta) -> None:
    mta = sendmail_mta
    target = address(mta, "added")
    with mta.milter(apps.stamping()):
        send(mta, [target], message("add"))
    [delivered] = mta.sendmail.wait_for_mail(target)
    assert delivered.get_all("X-Stamped") == ["yes"]
    assert delivered["Subject"] == "add"


def test_sendmail_header_changed_and_deleted(sendmail_mta: SendmailMta) -> None:
    mta = sendmail_mta
    app = App("edit")

    @app.on("eom")
    def edit(event: EndOfMessage, ctx: Context) -> None:
        ctx.change_header("Subject", "[tagged] change")
        ctx.delete_header("X-Drop")
        # Delete the first X-Twice, then change "the second": Sendmail only marks a
        # deleted header, so the second is still index 2 (Postfix removes the header and
        # renumbers: there, index 2 would no longer exist and the value would be appended).
        ctx.delete_header("X-Twice", index=1)
        ctx.change_header("X-Twice", "second changed", index=2)

    data = message("change", X_Twice="first", X_Drop="gone")
    data = data.replace(b"X-Drop: gone\r\n", b"X-Twice: second\r\nX-Drop: gone\r\n")
    target = address(mta, "changed")
    with mta.milter(app):
        send(mta, [target], data)
    [delivered] = mta.sendmail.wait_for_mail(target)
    assert delivered["Subject"] == "[tagged] change"
    assert delivered.get_all("X-Twice") == ["second changed"]
    assert delivered.get_all("X-Drop") is None


def test_sendmail_header_inserted_at_top(sendmail_mta: SendmailMta) -> None:
    mta = sendmail_mta
    target = address(mta, "inserted")
    with mta.milter(apps.inserting()):
        send(mta, [target], message("insert"))
    [delivered] = mta.sendmail.wait_for_mail(target)
    names = list(delivered.keys())
    assert names[0] == "X-Top"
    assert names[1] == "Received"  # index 0 is above Sendmail's own Received: header


@pytest.mark.parametrize("size", [100, 1024 * 1024], ids=["small", "1MiB"])
def test_sendmail_body_replaced(sendmail_mta: SendmailMta, size: int) -> None:
    mta = sendmail_mta
    new_body = apps.replacement_body(size)
    target = address(mta, f"body{size}")
    with mta.milter(apps.replacing_body(new_body)):
        send(mta, [target], message("body", "original body\r\n"))
    [delivered] = mta.sendmail.wait_for_deliveries(target)
    assert delivered.message()["Subject"] == "body"
    assert delivered.data.split(b"\r\n\r\n", 1)[1] == new_body


def test_sendmail_recipient_added_and_deleted(sendmail_mta: SendmailMta) -> None:
    mta = sendmail_mta
    removed, kept, added = (address(mta, n) for n in ("removed", "kept", "archived"))
    with mta.milter(apps.rerouting(removed, added)):
        send(mta, [removed, kept], message("recipients"))
    [delivery] = mta.sendmail.wait_for_deliveries(kept)
    # Both remaining recipients go to the smart host in one SMTP transaction.
    assert sorted(delivery.recipients) == sorted([kept, added])
    assert delivery.message()["Subject"] == "recipients"
    assert mta.sendmail.deliveries_to(removed) == []
    log = mta.sendmail.wait_for_log(f"Milter (main) delete: rcpt <{removed}>, naddrs=1")
    assert f"Milter (main) add: rcpt: <{added}>" in log


def test_sendmail_sender_changed(sendmail_mta: SendmailMta) -> None:
    mta = sendmail_mta
    target = address(mta, "sender")
    with mta.milter(apps.changing_sender()):
        send(mta, [target], message("sender"))
    [delivery] = mta.sendmail.wait_for_deliveries(target)
    assert delivery.sender == "bounces@test.example"  # the envelope the sink saw


def test_sendmail_quarantine_keeps_reason(sendmail_mta: SendmailMta) -> None:
    mta = sendmail_mta
    held = address(mta, "held")
    with mta.milter(apps.quarantining("suspicious attachment")):
        refused = send(mta, [held], message("hold me"))
    assert refused == {}  # the client is told the message was accepted
    # Unlike Postfix (hold queue, reason dropped), Sendmail keeps the reason: the queue
    # file becomes hf<id> with a "q" line, and mailq -qQ lists it.
    [entry] = [e for e in mta.sendmail.wait_for_quarantine() if held in e["recipients"]]
    assert entry["reason"] == "suspicious attachment"
    listing = mta.sendmail.mailq_quarantine()
    assert entry["id"] in listing
    assert "QUARANTINE: suspicious attachment" in listing
    assert "milter=main, quarantine=suspicious attachment" in mta.sendmail.syslog()
    assert mta.sendmail.deliveries_to(held) == []


def test_sendmail_discard(sendmail_mta: SendmailMta) -> None:
    mta = sendmail_mta
    target = address(mta, "discarded")
    with mta.milter(apps.discarding()):
        refused = send(mta, [target], message("discard me"))
    assert refused == {}  # the client is told the message was accepted
    # Postfix logs "milter-discard"; Sendmail logs the milter's verdict and the recipient.
    log = mta.sendmail.wait_for_log(f"to=<{target}>, delay=")
    assert "milter=main, discard" in log
    assert "Milter: data, discard" in log
    [line] = [line for line in log.splitlines() if f"to=<{target}>" in line]
    assert line.endswith("stat=discarded")
    assert mta.sendmail.deliveries_to(target) == []


def test_sendmail_reject_at_mail_with_exact_reply(sendmail_mta: SendmailMta) -> None:
    mta = sendmail_mta
    with (
        mta.milter(apps.rejecting_spam_senders()),
        pytest.raises(smtplib.SMTPSenderRefused) as refused,
    ):
        send(mta, [address(mta, "rejected")], message("reject"), sender="x@spam.example")
    assert refused.value.smtp_code == 550
    # Sendmail puts the address before the milter's text at MAIL and RCPT ("<addr>...
    # text"); Postfix passes the text as it is. The code and enhanced code are the milter's.
    assert refused.value.smtp_error == b"5.7.1 <x@spam.example>... sender spam.example refused"
    log = mta.sendmail.syslog()
    assert "milter=main, action=mail, reject=550 5.7.1 sender spam.example refused" in log


def test_sendmail_tempfail_one_recipient_others_accepted(sendmail_mta: SendmailMta) -> None:
    mta = sendmail_mta
    deferred, accepted = address(mta, "deferred"), address(mta, "accepted")
    with mta.milter(apps.deferring_recipient(deferred)):
        refused = send(mta, [deferred, accepted], message("one recipient"))
    assert refused == {deferred: (451, b"4.2.1 mailbox busy, try later")}
    [delivery] = mta.sendmail.wait_for_deliveries(accepted)
    assert delivery.recipients == (accepted,)


def test_sendmail_multiline_reply(sendmail_mta: SendmailMta) -> None:
    mta = sendmail_mta
    app = apps.refusing_with_lines("first line\n100% second line")
    with mta.milter(app), pytest.raises(smtplib.SMTPDataError) as refused:
        send(mta, [address(mta, "multiline")], message("multi"))
    # On the wire the "%" is "%%" (Sendmail logs "100%% second line"); Sendmail unescapes
    # it in the SMTP reply, as Postfix does.
    assert refused.value.smtp_code == 550
    assert refused.value.smtp_error == b"5.7.1 first line\n5.7.1 100% second line"


def test_sendmail_raising_handler_tempfails_then_next_message_is_fine(
    sendmail_mta: SendmailMta,
) -> None:
    mta = sendmail_mta
    target = address(mta, "flaky")
    with (
        mta.milter(apps.failing_first()),
        smtplib.SMTP("127.0.0.1", mta.smtp_port, timeout=60) as smtp,
    ):
        with pytest.raises(smtplib.SMTPDataError) as failed:
            smtp.sendmail(SENDER, [target], message("first"))
        # The App's fallback is a plain tempfail ("t", no text): Sendmail answers with its
        # own text (Postfix: "451 4.7.1 Service unavailable - try again later").
        assert failed.value.smtp_code == 451
        assert failed.value.smtp_error == b"4.3.2 Please try again later"
        smtp.rset()
        assert smtp.sendmail(SENDER, [target], message("second")) == {}
    [delivered] = mta.sendmail.wait_for_mail(target)
    assert delivered["Subject"] == "second"
    assert delivered["X-Second"] == "ok"


def test_sendmail_several_messages_in_one_session(sendmail_mta: SendmailMta) -> None:
    mta = sendmail_mta
    seen: list[tuple[str, str | None]] = []
    target = address(mta, "several")
    with (
        mta.milter(apps.counting(seen)),
        smtplib.SMTP("127.0.0.1", mta.smtp_port, timeout=60) as smtp,
    ):
        for number in range(3):
            smtp.sendmail(f"s{number}@test.example", [target], message(f"msg {number}"))
    delivered = mta.sendmail.wait_for_mail(target, 3)
    assert sorted(m["X-Count"] for m in delivered) == ["1", "2", "3"]
    assert [sender for sender, _ in seen] == [f"s{n}@test.example" for n in range(3)]
    assert len({queue_id for _, queue_id in seen}) == 3
    assert all(queue_id for _, queue_id in seen)


def test_sendmail_default_macros_reach_handlers(sendmail_mta: SendmailMta) -> None:
    # Sendmail's own lists (sendmail.cf Milter.macros.*), the App asks for none.
    mta = sendmail_mta
    app = App("macros")
    seen: dict[str, str | None] = {}

    @app.on("connect")
    def at_connect(event: Connect, ctx: Context) -> None:
        for name in ("j", "{daemon_name}", "{client_addr}"):
            seen[name] = ctx.macros.get(name)

    @app.on("envfrom")
    def at_mail(event: EnvFrom, ctx: Context) -> None:
        seen["i"] = ctx.macros.get("i")
        seen["mail_addr"] = ctx.macros.get("mail_addr")

    @app.on("eom")
    def at_eom(event: EndOfMessage, ctx: Context) -> None:
        seen["queue_id"] = ctx.message.queue_id
        seen["msg_id"] = ctx.macros.get("msg_id")

    target = address(mta, "macros")
    with mta.milter(app):
        send(mta, [target], message("macros"))
    [delivered] = mta.sendmail.wait_for_mail(target)
    assert seen["j"] == HOSTNAME
    assert seen["{daemon_name}"] == "MTA-test"  # DAEMON_OPTIONS Name=
    assert seen["{client_addr}"] == "127.0.0.1"
    assert seen["mail_addr"] == SENDER
    # Sendmail knows the queue id at MAIL already (Postfix only after the first RCPT).
    queue_id = seen["i"]
    assert queue_id
    assert seen["queue_id"] == queue_id
    assert f"id {queue_id}" in delivered["Received"]
    assert seen["msg_id"] == delivered["Message-Id"]


def test_sendmail_requested_macros_reach_handlers(sendmail_mta: SendmailMta) -> None:
    # Lists the App asks for in negotiation replace Sendmail's lists for those stages.
    # Sendmail uses a milter's end-of-message list only if that milter also sent an
    # end-of-header list (milter.c picks the EOM list by the EOH flag), so this App asks
    # for an empty "eoh" list too; see the next test for what happens without it.
    mta = sendmail_mta
    app = App(
        "macros",
        macros={
            "envfrom": ["{client_addr}", "{mail_addr}"],
            "eoh": [],
            "eom": ["i", "{client_name}"],
        },
    )
    seen: dict[str, str | None] = {}

    @app.on("envfrom")
    def at_mail(event: EnvFrom, ctx: Context) -> None:
        seen["client_addr"] = ctx.macros.get("{client_addr}")
        seen["mail_addr"] = ctx.macros.get("mail_addr")
        seen["i_at_mail"] = ctx.macros.get("i")

    @app.on("eom")
    def at_eom(event: EndOfMessage, ctx: Context) -> None:
        seen["queue_id"] = ctx.message.queue_id
        seen["client_name"] = ctx.macros.get("client_name")
        seen["msg_id"] = ctx.macros.get("msg_id")

    target = address(mta, "requested")
    with mta.milter(app):
        send(mta, [target], message("macros"))
    [delivered] = mta.sendmail.wait_for_mail(target)
    assert seen["client_addr"] == "127.0.0.1"
    assert seen["mail_addr"] == SENDER
    assert seen["i_at_mail"] is None  # our envfrom list replaced Sendmail's (which has i)
    assert seen["client_name"] == "localhost"
    assert seen["queue_id"]
    assert f"id {seen['queue_id']}" in delivered["Received"]
    assert seen["msg_id"] is None  # our eom list replaced Sendmail's ({msg_id})


def test_sendmail_eom_macros_without_eoh_list(sendmail_mta: SendmailMta) -> None:
    mta = sendmail_mta
    app = App("eom-macros", macros={"eom": ["{client_name}"]})
    seen: dict[str, str | None] = {}

    @app.on("eom")
    def at_eom(event: EndOfMessage, ctx: Context) -> None:
        seen["client_name"] = ctx.macros.get("client_name")
        seen["msg_id"] = ctx.macros.get("msg_id")

    target = address(mta, "eommacros")
    with mta.milter(app):
        send(mta, [target], message("macros"))
    mta.sendmail.wait_for_mail(target)
    assert seen["msg_id"] is None, f"Sendmail sent its default EOM list instead: {seen}"
    assert seen["client_name"] == "localhost"


def test_sendmail_slow_eom_kept_alive_by_progress(sendmail_mta: SendmailMta) -> None:
    # The slow listener's filter has T=R:2s;E:5s. The handler works for 3 s; progress
    # packets every 0.5 s restart Sendmail's 2 s read timeout, and 3 s is within E.
    mta = sendmail_mta
    target = address(mta, "slow")
    with mta.milter(apps.slow(3, progress_interval=0.5)):
        send(mta, [target], message("slow"), port=mta.sendmail.slow_port)
    [delivered] = mta.sendmail.wait_for_mail(target)
    assert delivered["X-Slow"] == "done"


def test_sendmail_progress_does_not_extend_total_eom_timeout(sendmail_mta: SendmailMta) -> None:
    # Sendmail checks its total end-of-message timeout (E:5s) each time a packet arrives:
    # a handler that sends progress but needs 7 s is given up at the first progress packet
    # after 5 s, and the filter's F=T turns that into a temporary failure. (Postfix has no
    # total: there, progress keeps a handler alive indefinitely.)
    mta = sendmail_mta
    target = address(mta, "tooslow")
    with (
        mta.milter(apps.slow(7, progress_interval=0.5)),
        pytest.raises(smtplib.SMTPDataError) as failed,
    ):
        send(mta, [target], message("too slow"), port=mta.sendmail.slow_port)
    assert failed.value.smtp_code == 451
    assert "milter_data(slow): EOM ACK/NAK timeout" in mta.sendmail.syslog()
    assert mta.sendmail.deliveries_to(target) == []


def test_sendmail_slow_eom_without_progress_times_out(sendmail_mta: SendmailMta) -> None:
    # Without progress packets the same listener gives up after its 2 s read timeout.
    mta = sendmail_mta
    target = address(mta, "noprogress")
    with (
        mta.milter(apps.slow(3, progress_interval=60)),
        pytest.raises(smtplib.SMTPDataError) as failed,
    ):
        send(mta, [target], message("no progress"), port=mta.sendmail.slow_port)
    assert failed.value.smtp_code == 451
    assert failed.value.smtp_error == b"4.3.2 Please try again later"  # F=T, Sendmail's text
    assert "Milter (slow): timeout before data read, where=eom" in mta.sendmail.syslog()


def test_sendmail_200_concurrent_deliveries_each_stamped_once(sendmail_mta: SendmailMta) -> None:
    mta = sendmail_mta
    app = apps.stamping_queue_id()
    count = 200
    target = address(mta, "load")

    def deliver(number: int) -> dict[str, tuple[int, bytes]]:
        return send(mta, [target], message(f"load {number}"))

    with mta.milter(app), concurrent.futures.ThreadPoolExecutor(count) as pool:
        results = list(pool.map(deliver, range(count)))
    assert results == [{}] * count
    delivered = mta.sendmail.wait_for_mail(target, count, timeout=120)
    assert len(delivered) == count
    assert sorted(m["Subject"] for m in delivered) == sorted(f"load {n}" for n in range(count))
    stamps = [m.get_all("X-Load") or [] for m in delivered]
    assert all(len(stamp) == 1 for stamp in stamps)
    assert len({stamp[0] for stamp in stamps}) == count  # each its own queue id
