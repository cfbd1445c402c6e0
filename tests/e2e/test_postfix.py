"""End to end: milterapp apps behind a real Postfix, over inet and over a unix socket.

Each test serves its own App where the private Postfix expects its milter, sends mail with
smtplib, and checks what Postfix replied, delivered, held or discarded.
"""

from __future__ import annotations

import concurrent.futures
import os
import smtplib

import pytest

from milterapp import (
    Context,
    EndOfMessage,
    EnvFrom,
)
from milterapp.app import App
from tests.e2e import apps
from tests.e2e.common import SENDER, message
from tests.e2e.conftest import Mta
from tests.e2e.postfix import (
    AUTH_PASSWORD,
    AUTH_REALM,
    AUTH_USER,
    MAILBOX_NAMES,
    sasl_available,
)


def send(
    mta: Mta, recipients: list[str], data: bytes, *, sender: str = SENDER, port: int | None = None
) -> dict[str, tuple[int, bytes]]:
    with smtplib.SMTP("127.0.0.1", port or mta.postfix.smtp_port, timeout=60) as smtp:
        return smtp.sendmail(sender, recipients, data)


def mailbox(mta: Mta, name: str) -> str:
    assert name in MAILBOX_NAMES, f"add {name!r} to MAILBOX_NAMES in tests/e2e/postfix.py"
    return f"{name}-{mta.transport}"


def address(mta: Mta, name: str) -> str:
    return f"{mailbox(mta, name)}@example.org"


def test_postfix_header_added(mta: Mta) -> None:
    with mta.milter(apps.stamping()):
        send(mta, [address(mta, "added")], message("add"))
    [delivered] = mta.postfix.wait_for_mail(mailbox(mta, "added"))
    assert delivered.get_all("X-Stamped") == ["yes"]
    assert delivered["Subject"] == "add"


def test_postfix_header_changed_and_deleted(mta: Mta) -> None:
    app = App("edit")

    @app.on("eom")
    def edit(event: EndOfMessage, ctx: Context) -> None:
        ctx.change_header("Subject", "[tagged] change")
        ctx.change_header("X-Twice", "second changed", index=2)
        ctx.delete_header("X-Drop")

    data = message("change", X_Twice="first", X_Drop="gone")
    data = data.replace(b"X-Drop: gone\r\n", b"X-Twice: second\r\nX-Drop: gone\r\n")
    with mta.milter(app):
        send(mta, [address(mta, "changed")], data)
    [delivered] = mta.postfix.wait_for_mail(mailbox(mta, "changed"))
    assert delivered["Subject"] == "[tagged] change"
    assert delivered.get_all("X-Twice") == ["first", "second changed"]
    assert delivered.get_all("X-Drop") is None


def test_postfix_header_inserted_at_top(mta: Mta) -> None:
    with mta.milter(apps.inserting()):
        send(mta, [address(mta, "inserted")], message("insert"))
    [delivered] = mta.postfix.wait_for_mail(mailbox(mta, "inserted"))
    delivery = ("Return-Path", "Delivered-To", "X-Original-To")  # added by virtual(8)
    names = [name for name in delivered if name not in delivery]
    assert names[0] == "X-Top"
    assert names[1] == "Received"  # index 0 is above Postfix's own Received: header


@pytest.mark.parametrize("size", [100, 1024 * 1024], ids=["small", "1MiB"])
def test_postfix_body_replaced(mta: Mta, size: int) -> None:
    new_body = apps.replacement_body(size)
    name = f"body{size}"
    with mta.milter(apps.replacing_body(new_body)):
        send(mta, [address(mta, name)], message("body", "original body\r\n"))
    [delivered] = mta.postfix.wait_for_mail(mailbox(mta, name))
    body = delivered.get_payload(decode=True)
    assert isinstance(body, bytes)
    assert body.replace(b"\r\n", b"\n") == new_body.replace(b"\r\n", b"\n")


def test_postfix_recipient_added_and_deleted(mta: Mta) -> None:
    removed, kept, added = (address(mta, n) for n in ("removed", "kept", "archived"))
    with mta.milter(apps.rerouting(removed, added)):
        send(mta, [removed, kept], message("recipients"))
    assert mta.postfix.wait_for_mail(mailbox(mta, "kept"))
    [archived] = mta.postfix.wait_for_mail(mailbox(mta, "archived"))
    assert archived["Subject"] == "recipients"
    mta.postfix.wait_for_log(f"to=<{added}>")
    assert mta.postfix.mailbox(mailbox(mta, "removed")) == []


def test_postfix_sender_changed(mta: Mta) -> None:
    with mta.milter(apps.changing_sender()):
        send(mta, [address(mta, "sender")], message("sender"))
    [delivered] = mta.postfix.wait_for_mail(mailbox(mta, "sender"))
    assert delivered["Return-Path"] == "<bounces@test.example>"


def test_postfix_quarantine_holds_message(mta: Mta) -> None:
    with mta.milter(apps.quarantining("suspicious attachment")):
        send(mta, [address(mta, "held")], message("hold me"))
    held = mta.postfix.wait_for_queue("hold")
    assert any(
        recipient.get("address") == address(mta, "held")
        for entry in held
        for recipient in entry.get("recipients", [])  # type: ignore[union-attr]
    )
    assert "milter triggers HOLD action" in mta.postfix.log()
    assert mta.postfix.mailbox(mailbox(mta, "held")) == []


def test_postfix_discard(mta: Mta) -> None:
    with mta.milter(apps.discarding()):
        refused = send(mta, [address(mta, "discarded")], message("discard me"))
    assert refused == {}  # the client is told the message was accepted
    mta.postfix.wait_for_log("milter-discard")
    assert mta.postfix.mailbox(mailbox(mta, "discarded")) == []


def test_postfix_reject_at_mail_with_exact_reply(mta: Mta) -> None:
    with (
        mta.milter(apps.rejecting_spam_senders()),
        pytest.raises(smtplib.SMTPSenderRefused) as refused,
    ):
        send(mta, [address(mta, "rejected")], message("reject"), sender="x@spam.example")
    assert refused.value.smtp_code == 550
    assert refused.value.smtp_error == b"5.7.1 sender spam.example refused"


def test_postfix_tempfail_one_recipient_others_accepted(mta: Mta) -> None:
    deferred, accepted = address(mta, "deferred"), address(mta, "accepted")
    with mta.milter(apps.deferring_recipient(deferred)):
        refused = send(mta, [deferred, accepted], message("one recipient"))
    assert refused == {deferred: (451, b"4.2.1 mailbox busy, try later")}
    assert mta.postfix.wait_for_mail(mailbox(mta, "accepted"))
    assert mta.postfix.mailbox(mailbox(mta, "deferred")) == []


def test_postfix_multiline_reply(mta: Mta) -> None:
    app = apps.refusing_with_lines(["first line", "100% second line"])
    with mta.milter(app), pytest.raises(smtplib.SMTPDataError) as refused:
        send(mta, [address(mta, "multiline")], message("multi"))
    assert refused.value.smtp_code == 550
    assert refused.value.smtp_error == b"5.7.1 first line\n5.7.1 100% second line"


def test_postfix_raising_handler_tempfails_then_next_message_is_fine(mta: Mta) -> None:
    target = address(mta, "flaky")
    with (
        mta.milter(apps.failing_first()),
        smtplib.SMTP("127.0.0.1", mta.postfix.smtp_port, timeout=60) as smtp,
    ):
        with pytest.raises(smtplib.SMTPDataError) as failed:
            smtp.sendmail(SENDER, [target], message("first"))
        assert failed.value.smtp_code == 451
        smtp.rset()
        assert smtp.sendmail(SENDER, [target], message("second")) == {}
    [delivered] = mta.postfix.wait_for_mail(mailbox(mta, "flaky"))
    assert delivered["Subject"] == "second"
    assert delivered["X-Second"] == "ok"


def test_postfix_several_messages_in_one_session(mta: Mta) -> None:
    seen: list[tuple[str, str | None]] = []
    target = address(mta, "several")
    with (
        mta.milter(apps.counting(seen)),
        smtplib.SMTP("127.0.0.1", mta.postfix.smtp_port, timeout=60) as smtp,
    ):
        for number in range(3):
            smtp.sendmail(f"s{number}@test.example", [target], message(f"msg {number}"))
    delivered = mta.postfix.wait_for_mail(mailbox(mta, "several"), 3)
    assert sorted(m["X-Count"] for m in delivered) == ["1", "2", "3"]
    assert [sender for sender, _ in seen] == [f"s{n}@test.example" for n in range(3)]
    assert len({queue_id for _, queue_id in seen}) == 3


def test_postfix_macros_reach_handlers(mta: Mta) -> None:
    app = App(
        "macros",
        macros={"envfrom": ["{client_addr}", "{mail_addr}"], "eom": ["i", "{client_name}"]},
    )
    seen: dict[str, str | None] = {}

    @app.on("envfrom")
    def at_mail(event: EnvFrom, ctx: Context) -> None:
        seen["client_addr"] = ctx.macros.get("{client_addr}")
        seen["mail_addr"] = ctx.macros.get("mail_addr")

    @app.on("eom")
    def at_eom(event: EndOfMessage, ctx: Context) -> None:
        seen["queue_id"] = ctx.message.queue_id
        seen["client_name"] = ctx.macros.get("client_name")
        seen["j"] = ctx.macros.get("j")

    with mta.milter(app):
        send(mta, [address(mta, "macros")], message("macros"))
    mta.postfix.wait_for_mail(mailbox(mta, "macros"))
    assert seen["client_addr"] == "127.0.0.1"
    assert seen["mail_addr"] == SENDER
    assert seen["client_name"] == "localhost"
    assert seen["j"] == "mx.test.example"
    queue_id = seen["queue_id"]
    assert queue_id
    assert f"{queue_id}: " in mta.postfix.log()


def test_postfix_slow_eom_kept_alive_by_progress(mta: Mta) -> None:
    # This listener has milter_content_timeout=2s; the handler works for 3.5 s, and the
    # server's progress packets every 0.5 s keep Postfix waiting.
    with mta.milter(apps.slow(3.5, progress_interval=0.5)):
        send(mta, [address(mta, "slow")], message("slow"), port=mta.postfix.slow_port)
    [delivered] = mta.postfix.wait_for_mail(mailbox(mta, "slow"))
    assert delivered["X-Slow"] == "done"


def test_postfix_200_concurrent_deliveries_each_stamped_once(mta: Mta) -> None:
    app = apps.stamping_queue_id()
    target = address(mta, "load")

    def deliver(number: int) -> dict[str, tuple[int, bytes]]:
        return send(mta, [target], message(f"load {number}"))

    with mta.milter(app), concurrent.futures.ThreadPoolExecutor(200) as pool:
        results = list(pool.map(deliver, range(200)))
    assert results == [{}] * 200
    delivered = mta.postfix.wait_for_mail(mailbox(mta, "load"), 200, timeout=120)
    assert len(delivered) == 200
    assert sorted(m["Subject"] for m in delivered) == sorted(f"load {n}" for n in range(200))
    assert all(len(m.get_all("X-Load") or []) == 1 for m in delivered)


def test_postfix_auth_macros_reach_handlers(mta: Mta) -> None:
    if not sasl_available():
        reason = "SMTP AUTH needs saslpasswd2 and the PLAIN mechanism (sasl2-bin, libsasl2-modules)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    app = App("auth", macros={"envfrom": ["{auth_type}", "{auth_authen}", "{auth_author}"]})
    seen: dict[str, str | None] = {}

    @app.on("envfrom")
    def at_mail(event: EnvFrom, ctx: Context) -> None:
        seen.update({name: ctx.macros.get(name) for name in ("auth_type", "{auth_authen}")})

    with mta.milter(app), smtplib.SMTP("127.0.0.1", mta.postfix.smtp_port, timeout=60) as smtp:
        smtp.login(AUTH_USER, AUTH_PASSWORD)
        smtp.sendmail(SENDER, [address(mta, "authed")], message("auth"))
    mta.postfix.wait_for_mail(mailbox(mta, "authed"))
    assert seen == {"auth_type": "PLAIN", "{auth_authen}": f"{AUTH_USER}@{AUTH_REALM}"}
