"""End to end: an App that calls upstream milters, behind a real Postfix and a real Sendmail.

The chain app runs as its own ``milterapp run`` process where the MTA expects its milter.
Its chain, in order:

1. its own handlers: 550 at MAIL for a blocked sender; at end of message ``X-Chain: front``
   and ``[chain]`` before the Subject;
2. a second milterapp app, run as its own process: ``X-Second: yes``, ``X-Second-Saw`` (the
   ``X-Chain`` values it was given), and a line appended to the body;
3. a real OpenDKIM, last, so that its signature covers the edits of the parties before it;
   skipped for connections whose HELO is ``nosign.example`` (a condition at HELO).

dkimpy checks the signature in the bytes the MTA delivered. OpenDKIM signs From, Subject and
Date here (its default header list), not the X- headers: the chain's Subject and body edits
are what show that OpenDKIM was replayed the edited message, and the same check fails on
the message as it was sent.

libmilter ignores QUIT_NC except right after an end of message it answered CONTINUE
(OpenDKIM answers ACCEPT): the chain keeps a connection for reuse only then, which the test
with ``reuse=True`` shows against the real OpenDKIM.
"""

from __future__ import annotations

import email
import email.policy
import json
import os
import smtplib
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.common import SENDER, free_port, message, poll
from tests.e2e.conftest import Mta, _skip_or_fail
from tests.e2e.opendkim import OpenDkim, opendkim_available
from tests.e2e.postfix import MAILBOX_NAMES
from tests.e2e.sendmail import SendmailMta

BLOCKED = "blocked@test.example"
NOSIGN_HELO = "nosign.example"
FOOTER = b"checked by second\r\n"
#: What Postfix answers at MAIL when its milter tempfailed the connection (smtplib's view).
DEFERRED_AT_MAIL = (451, b"4.7.1 Service unavailable - try again later", "SMTPSenderRefused")
#: What virtual(8) writes above the message it delivers.
DELIVERY_HEADERS = ("Return-Path", "X-Original-To", "Delivered-To")

#: The second upstream. It logs every sender it is given, and says which ``X-Chain`` it
#: saw: the chain replays it the message with the edits of the parties before it applied.
SECOND_APP = textwrap.dedent(
    """
    from milterapp import App

    app = App("second", keep_message=True)

    @app.on("envfrom")
    def sender(event, ctx):
        ctx.log.info("second_saw_sender", sender=event.address)

    @app.on("eom")
    def stamp(event, ctx):
        seen = [h.value.strip() for h in ctx.message.headers if h.name == "X-Chain"]
        ctx.add_header("X-Second", "yes")
        ctx.add_header("X-Second-Saw", ",".join(seen) or "none")
        ctx.replace_body(ctx.message.body_bytes() + {footer!r})
    """
).format(footer=FOOTER)


def chain_app(second: str, dkim: str, **dkim_options: object) -> str:
    """The chain app's module: its own handlers, then ``second``, then OpenDKIM at ``dkim``
    (unless the HELO name is NOSIGN_HELO), with ``dkim_options`` for ``use_milter`` (the
    defaults otherwise: connections kept for reuse where libmilter allows it).
    """
    options = {"on_failure": "tempfail", **dkim_options}
    return textwrap.dedent(
        f"""
        from milterapp import App, Reject

        app = App("chain")

        @app.on("envfrom")
        def refuse(event, ctx):
            if "blocked" in event.address:
                return Reject(code=550, xcode="5.7.1", text="blocked sender")
            return None

        @app.on("eom")
        def stamp(event, ctx):
            ctx.add_header("X-Chain", "front")
            subject = next(h.value for h in ctx.message.headers if h.name == "Subject")
            ctx.change_header("Subject", "[chain] " + subject.strip())

        app.use_milter({second!r}, name="second")
        app.use_milter(
            {dkim!r},
            name="opendkim",
            when=lambda ctx: ctx.helo != {NOSIGN_HELO!r},
            when_at="helo",
            **{options!r},
        )
        """
    )


class MilterProcess:
    """``python -m milterapp run DIR/app.py:app --spec SPEC --log-format json``, its stderr
    (JSON log lines) read in a thread; ``close()`` stops it."""

    def __init__(self, directory: Path, source: str, spec: str, *options: str) -> None:
        path = directory / "app.py"
        path.write_text(source)
        command = [sys.executable, "-m", "milterapp", "run", f"{path}:app", "--spec", spec]
        command += ["--log-format", "json", "--shutdown-grace", "5", *options]
        env = {k: v for k, v in os.environ.items() if not k.startswith("LISTEN_")}
        env.pop("MILTERAPP_SPEC", None)
        self.spec = spec
        self.process = subprocess.Popen(  # noqa: S603 - our own fixed command line
            command, cwd=directory, stderr=subprocess.PIPE, text=True, env=env
        )
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        try:
            self.wait_for("listening")
        except BaseException:
            self.close()
            raise

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line)

    def entries(self, event: str) -> list[dict[str, Any]]:
        """The log lines of ``event`` so far, parsed."""
        lines = [json.loads(line) for line in list(self.lines) if line.startswith("{")]
        return [entry for entry in lines if entry.get("event") == event]

    def log(self) -> str:
        return "".join(self.lines)

    def wait_for(
        self,
        event: str,
        count: int = 1,
        timeout: float = 30.0,
        where: Callable[[dict[str, Any]], bool] = lambda entry: True,
    ) -> list[dict[str, Any]]:
        """Poll until ``count`` lines of ``event`` (those ``where`` accepts) were logged."""

        def read() -> list[dict[str, Any]]:
            exited = self.process.poll() is not None and not self.reader.is_alive()
            found = [entry for entry in self.entries(event) if where(entry)]
            if exited and len(found) < count:
                raise AssertionError(f"the milter exited:\n{self.log()}")
            return found

        return poll(read, count, timeout, f"{count} {event!r} line(s)", self.log)

    def close(self) -> None:
        """Stop it (SIGTERM, then SIGKILL) and close its stderr."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)
        self.reader.join(timeout=30)
        if self.process.stderr is not None:
            self.process.stderr.close()


@pytest.fixture(scope="module")
def second(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MilterProcess]:
    """The second upstream, a milterapp app in its own process on a loopback port."""
    directory = tmp_path_factory.mktemp("second")
    milter = MilterProcess(directory, SECOND_APP, f"inet:{free_port()}@[127.0.0.1]")
    try:
        yield milter
    finally:
        milter.close()


@pytest.fixture
def own_opendkim() -> Iterator[Callable[..., OpenDkim]]:
    """Starts OpenDKIM instances of the test's own (stopped at its end), for tests that stop
    them: the session's ``opendkim`` stays up for the others."""
    reason = opendkim_available()
    if reason:
        _skip_or_fail(reason)
    started: list[OpenDkim] = []

    def start(**options: Any) -> OpenDkim:
        signer = OpenDkim(**options)
        started.append(signer)
        signer.start()
        return signer

    yield start
    for signer in started:
        signer.stop()


def serve_chain(
    directory: Path, mta: Mta | SendmailMta, second: str, dkim: str, **options: object
) -> MilterProcess:
    """The chain app, serving where ``mta`` expects its milter."""
    extra = []
    # Postfix's smtpd runs as user postfix (pytest may load conftest's Mta class under
    # another module name than ours: no isinstance).
    if hasattr(mta, "postfix") and mta.transport == "unix":
        extra = ["--unix-socket-group", "postfix"]
    return MilterProcess(directory, chain_app(second, dkim, **options), mta.milter_spec, *extra)


def send(
    port: int, recipient: str, data: bytes, *, sender: str = SENDER, helo: str | None = None
) -> dict[str, tuple[int, bytes]]:
    with smtplib.SMTP("127.0.0.1", port, timeout=60, local_hostname=helo) as smtp:
        return smtp.sendmail(sender, [recipient], data)


def parse(raw: bytes) -> EmailMessage:
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(parsed, EmailMessage)
    return parsed


def body_of(raw: bytes) -> bytes:
    return raw.replace(b"\r\n", b"\n").partition(b"\n\n")[2]


def assert_chained(mail: EmailMessage, subject: str) -> None:
    """The edits of the app's own handlers and of the second upstream are all there."""
    assert mail.get_all("X-Chain") == ["front"]
    assert mail.get_all("X-Second") == ["yes"]
    assert mail["X-Second-Saw"] == "front"  # replayed with the own handlers' edits
    assert mail["Subject"] == f"[chain] {subject}"


def assert_signed_over_the_edits(opendkim: OpenDkim, raw: bytes, subject: str) -> None:
    """The delivered message's signature verifies, and covers the chain's edits: undone,
    the same check fails."""
    assert opendkim.verify(raw)
    assert not opendkim.verify(raw.replace(f"[chain] {subject}".encode(), subject.encode()))
    footer = FOOTER.replace(b"\r\n", b"\n") if b"\r\n" not in raw else FOOTER
    assert not opendkim.verify(raw.replace(footer, b""))


# --- Postfix -------------------------------------------------------------------------------


def box(mta: Mta, name: str) -> str:
    assert name in MAILBOX_NAMES, f"add {name!r} to MAILBOX_NAMES in tests/e2e/postfix.py"
    return f"{name}-{mta.transport}"


def attempt(port: int, recipient: str, data: bytes, **options: Any) -> tuple[int, bytes, str]:
    """Send, and say how it went: (code, text, the exception's name or "sent")."""
    try:
        send(port, recipient, data, **options)
    except smtplib.SMTPResponseException as exc:
        return exc.smtp_code, exc.smtp_error, type(exc).__name__
    return 250, b"", "sent"


def test_postfix_chain_signs_the_edited_message_and_refuses_the_blocked_sender(
    mta: Mta, opendkim: OpenDkim, second: MilterProcess, tmp_path: Path
) -> None:
    name = box(mta, "chained")
    target = f"{name}@example.org"
    subject = f"chained {mta.transport}"
    chain = serve_chain(tmp_path, mta, second.spec, opendkim.spec)
    try:
        with pytest.raises(smtplib.SMTPSenderRefused) as refused:
            send(mta.postfix.smtp_port, target, message("blocked"), sender=BLOCKED)
        send(mta.postfix.smtp_port, target, message(subject, "Signed body.\r\n"))
        [raw] = mta.postfix.wait_for_raw_mail(name)
        [rejected] = chain.wait_for("message", where=lambda entry: entry["verdict"] == "reject")
    finally:
        chain.close()

    # Refused at MAIL by the app's own handler, which comes first: the upstreams after it
    # were never given that sender, and Postfix queued nothing (NOQUEUE).
    assert refused.value.smtp_code == 550
    assert refused.value.smtp_error == b"5.7.1 blocked sender"
    assert (rejected["stage"], rejected["sender"]) == ("envfrom", BLOCKED)
    saw = [entry["sender"] for entry in second.entries("second_saw_sender")]
    assert SENDER in saw
    assert BLOCKED not in saw
    assert (
        "NOQUEUE: milter-reject: MAIL from localhost[127.0.0.1]: 550 5.7.1 blocked sender; "
        f"from=<{BLOCKED}>"
    ) in mta.postfix.log()
    assert len(mta.postfix.raw_mailbox(name)) == 1  # the signed one alone

    mail = parse(raw)
    assert_chained(mail, subject)
    assert body_of(raw) == b"Signed body.\n" + FOOTER.replace(b"\r\n", b"\n")
    # OpenDKIM inserts its signature at index 0: above Postfix's own Received:, under what
    # virtual(8) writes at delivery; one space after the colon (OpenDKIM negotiates
    # HDR_LEADSPC and sends " v=1; ...", the chain gives Postfix the value without it).
    names = [field for field in mail if field not in DELIVERY_HEADERS]
    assert names[:2] == ["DKIM-Signature", "Received"]
    assert b"\nDKIM-Signature: v=1; a=rsa-sha256;" in raw
    tags = dict(
        tag.split("=", 1) for tag in "".join(str(mail["DKIM-Signature"]).split()).split(";")
    )
    assert (tags["d"], tags["s"]) == (opendkim.domain, opendkim.selector)
    assert "Subject" in tags["h"].split(":")
    # The bytes as virtual(8) wrote them (LF line ends, delivery headers on top) verify as
    # they are: dkimpy reads LF as CRLF, and checks only the headers named in h=.
    assert_signed_over_the_edits(opendkim, raw, subject)


def test_postfix_chain_condition_skips_opendkim_for_one_helo(
    mta: Mta, opendkim: OpenDkim, second: MilterProcess, tmp_path: Path
) -> None:
    name = box(mta, "skipped")
    target = f"{name}@example.org"
    chain = serve_chain(tmp_path, mta, second.spec, opendkim.spec)
    try:
        send(mta.postfix.smtp_port, target, message("unsigned"), helo=NOSIGN_HELO)
        [unsigned_raw] = mta.postfix.wait_for_raw_mail(name)
        # The condition held for that connection only: the next one is signed.
        send(mta.postfix.smtp_port, target, message("signed"), helo="client.test.example")
        signed_raw = mta.postfix.wait_for_raw_mail(name, 2)[1]
    finally:
        chain.close()

    unsigned = parse(unsigned_raw)
    assert_chained(unsigned, "unsigned")  # the other parties still had their turn
    assert unsigned.get_all("DKIM-Signature") is None
    assert not opendkim.verify(unsigned_raw)
    assert chain.entries("upstream_failed") == []  # skipped, not failed
    signed = parse(signed_raw)
    assert_chained(signed, "signed")
    assert_signed_over_the_edits(opendkim, signed_raw, "signed")


def test_postfix_opendkim_down_with_tempfail_defers_and_nothing_passes_unsigned(
    mta: Mta, own_opendkim: Callable[..., OpenDkim], second: MilterProcess, tmp_path: Path
) -> None:
    signer = own_opendkim(transport="unix")  # down, its socket is gone: ENOENT
    name = box(mta, "chain-down")
    target = f"{name}@example.org"
    port = mta.postfix.smtp_port
    chain = serve_chain(tmp_path, mta, second.spec, signer.spec, on_failure="tempfail")
    try:
        send(port, target, message("before"))
        [before] = mta.postfix.wait_for_raw_mail(name)
        signer.stop()
        log_start = len(mta.postfix.log())
        # The first finds OpenDKIM gone; the second comes while the chain backs off.
        outcomes = [attempt(port, target, message(f"after {index}")) for index in range(2)]
        failures = chain.wait_for("upstream_failed", 2)
    finally:
        chain.close()

    assert_signed_over_the_edits(signer, before, "before")
    # OpenDKIM is found down when the chain negotiates with its upstreams; its failure
    # answers where its condition is asked (HELO), and Postfix gives the 451 with its own
    # text at MAIL (smtpd_delay_reject).
    assert outcomes == [DEFERRED_AT_MAIL] * 2
    log = mta.postfix.log()[log_start:]
    assert log.count("NOQUEUE: milter-reject: EHLO from localhost[127.0.0.1]: 451 4.7.1") == 2
    assert [(f["upstream"], f["kind"], f["policy"]) for f in failures] == [
        ("opendkim", "unreachable", "tempfail")
    ] * 2
    assert "no such socket" in failures[0]["error"]
    assert "not retried for" in failures[1]["error"]  # backing off: not even tried
    # Nothing was queued: the mailbox holds the signed message alone.
    assert mta.postfix.raw_mailbox(name) == [before]


def test_postfix_opendkim_down_with_accept_delivers_unsigned(
    mta: Mta, own_opendkim: Callable[..., OpenDkim], second: MilterProcess, tmp_path: Path
) -> None:
    signer = own_opendkim(transport="inet")  # down, nobody listens: ECONNREFUSED
    name = box(mta, "chain-open")
    target = f"{name}@example.org"
    chain = serve_chain(tmp_path, mta, second.spec, signer.spec, on_failure="accept")
    try:
        send(mta.postfix.smtp_port, target, message("before"))
        [before] = mta.postfix.wait_for_raw_mail(name)
        signer.stop()
        send(mta.postfix.smtp_port, target, message("after"))
        after_raw = mta.postfix.wait_for_raw_mail(name, 2)[1]
        [failure] = chain.wait_for("upstream_failed")
    finally:
        chain.close()

    assert_signed_over_the_edits(signer, before, "before")
    after = parse(after_raw)
    assert_chained(after, "after")  # the rest of the chain went on without OpenDKIM
    assert after.get_all("DKIM-Signature") is None
    assert (failure["upstream"], failure["kind"], failure["policy"]) == (
        "opendkim",
        "unreachable",
        "accept",
    )


# --- reuse, and conditions while an upstream is down -------------------------------------


def test_postfix_reuse_on_with_opendkim_signs_every_connection(
    mta: Mta, opendkim: OpenDkim, second: MilterProcess, tmp_path: Path
) -> None:
    """``reuse=True`` (the default). OpenDKIM answers Accept at end of message, after which
    libmilter ignores QUIT_NC (and then the next CONNECT): the chain keeps only connections
    whose last message ended with Continue, so the next MTA connection gets a new one and
    is signed, without waiting for a deadline."""
    name = box(mta, "reused")
    target = f"{name}@example.org"
    port = mta.postfix.smtp_port
    chain = serve_chain(tmp_path, mta, second.spec, opendkim.spec, reuse=True, command_timeout=1)
    try:
        send(port, target, message("first"))
        mta.postfix.wait_for_raw_mail(name)
        outcome = attempt(port, target, message("second"))
        failures = chain.entries("upstream_failed")
    finally:
        chain.close()
    assert failures == []
    assert outcome == (250, b"", "sent")
    raw = mta.postfix.wait_for_raw_mail(name, 2)[1]
    assert_signed_over_the_edits(opendkim, raw, "second")


def test_postfix_condition_exempts_a_connection_while_opendkim_is_down(
    mta: Mta, own_opendkim: Callable[..., OpenDkim], second: MilterProcess, tmp_path: Path
) -> None:
    """OpenDKIM is down with ``on_failure="tempfail"``, but its condition says it does not
    apply to a client whose HELO is NOSIGN_HELO: that client's mail passes, unsigned."""
    signer = own_opendkim()
    signer.stop()
    name = box(mta, "exempt")
    target = f"{name}@example.org"
    chain = serve_chain(tmp_path, mta, second.spec, signer.spec, on_failure="tempfail")
    try:
        outcome = attempt(mta.postfix.smtp_port, target, message("exempt"), helo=NOSIGN_HELO)
        failures = chain.entries("upstream_failed")
    finally:
        chain.close()
    assert [f["upstream"] for f in failures] == ["opendkim"]  # found down, logged
    assert outcome == (250, b"", "sent")
    exempt = parse(mta.postfix.wait_for_raw_mail(name)[0])
    assert_chained(exempt, "exempt")
    assert exempt.get_all("DKIM-Signature") is None


# --- Sendmail ------------------------------------------------------------------------------


def test_sendmail_chain_signs_the_edited_message_and_refuses_the_blocked_sender(
    sendmail_mta: SendmailMta, opendkim: OpenDkim, second: MilterProcess, tmp_path: Path
) -> None:
    mta = sendmail_mta
    target = f"chained-{mta.transport}@example.org"
    subject = f"chained {mta.transport}"
    chain = serve_chain(tmp_path, mta, second.spec, opendkim.spec)
    try:
        with pytest.raises(smtplib.SMTPSenderRefused) as refused:
            send(mta.smtp_port, target, message("blocked"), sender=BLOCKED)
        send(mta.smtp_port, target, message(subject, "Signed body.\r\n"))
        [delivery] = mta.sendmail.wait_for_deliveries(target)
    finally:
        chain.close()

    # Sendmail puts the address before the milter's text at MAIL.
    assert refused.value.smtp_code == 550
    assert refused.value.smtp_error == f"5.7.1 <{BLOCKED}>... blocked sender".encode()
    assert [d.sender for d in mta.sendmail.deliveries_to(target)] == [SENDER]
    assert BLOCKED not in [entry["sender"] for entry in second.entries("second_saw_sender")]
    raw = delivery.data  # as Sendmail relayed it to the sink, CRLF
    mail = delivery.message()
    assert_chained(mail, subject)
    assert raw.split(b"\r\n\r\n", 1)[1] == b"Signed body.\r\n" + FOOTER
    # Index 0 is above Sendmail's own Received: too; one space after the colon.
    assert list(mail)[:2] == ["DKIM-Signature", "Received"]
    assert raw.startswith(b"DKIM-Signature: v=1; a=rsa-sha256;")
    assert_signed_over_the_edits(opendkim, raw, subject)
