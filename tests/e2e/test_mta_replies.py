"""End to end: milter replies whose effect depends on the MTA, asserted against the real ones.

``Shutdown()`` (SMFIR_SHUTDOWN, ``'4'`` on the wire) asks the MTA to answer the SMTP client
with 421 and close the session. What the MTAs installed here do with it, seen on 2026-12-06
with the reply sent as it is:

- Postfix 3.7 at MAIL: ``421 4.7.0 Server closing connection``, then it closes the session.
- Postfix 3.7 at end of message: the client is told ``250 ... queued as ID``, the session stays
  open, and the message is thrown away (the cleanup server logs ``milter-reject:
  END-OF-MESSAGE ... message content rejected``; Postfix 3.11 made it a temporary failure).
- Sendmail 8.17: not a reply it accepts from a filter. It logs ``returned bogus response 4``,
  puts the filter in error state and applies the filter's ``F=`` flag: here ``F=T``, so
  ``451 4.3.2 Please try again later`` (at MAIL, only from the next command on); without a
  flag the mail would pass unfiltered.

So milterapp sends Shutdown only where it is honoured (Postfix, before end of message, or
from 3.11 on; the ``v`` macro says which) and TempFail elsewhere: these tests check the
first case, and that nothing is lost in the others.

And ``milter_default_action = shutdown``, which Postfix documents from 3.11 on: Postfix 3.7
accepts the setting silently, then, when the milter is unreachable, logs ``unrecognized default
action: shutdown`` and answers ``451 4.3.5 Server configuration problem - try again later``.

docs/handlers.md and docs/deployment.md describe these results; the cases that behave otherwise
in later Postfix versions skip there, saying why, rather than assert a guess.
"""

from __future__ import annotations

import os
import shutil
import smtplib
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from milterapp import EndOfMessage, EnvFrom, Shutdown
from milterapp.app import App
from tests.e2e.common import SENDER, free_port, message
from tests.e2e.conftest import Mta
from tests.e2e.postfix import POSTFIX, Postfix, postfix_available
from tests.e2e.sendmail import SendmailMta

#: How long a message that must not be delivered is watched for (the MTAs deliver these
#: within a fraction of a second; there is no event to wait for when nothing happens).
QUIET_PERIOD = 2.0


def shutting_down(stage: str) -> App:
    """Replies ``Shutdown()`` at ``stage`` (``envfrom`` or ``eom``), and nothing else."""
    app = App(f"shutdown-{stage}")
    if stage == "envfrom":

        @app.on("envfrom")
        def at_mail(event: EnvFrom) -> Shutdown:
            return Shutdown()

    else:

        @app.on("eom")
        def at_end_of_message(event: EndOfMessage) -> Shutdown:
            return Shutdown()

    return app


@dataclass
class Session:
    """One SMTP session as the client saw it: each command's reply, and whether the MTA
    closed the connection afterwards."""

    replies: dict[str, tuple[int, str]] = field(default_factory=dict)
    closed: bool = False

    def reply(self, command: str) -> str:
        code, text = self.replies[command]
        return f"{code} {text}"


def converse(port: int, recipient: str, data: bytes) -> Session:
    """EHLO, MAIL, RCPT and DATA as far as the MTA lets the client go; then a NOOP, to see
    whether the MTA still talks (a closed session makes smtplib raise)."""
    session = Session()
    smtp = smtplib.SMTP("127.0.0.1", port, timeout=30)
    try:
        smtp.ehlo("client.test.example")
        steps: list[tuple[str, Callable[[], tuple[int, bytes]]]] = [
            ("MAIL", lambda: smtp.mail(SENDER)),
            ("RCPT", lambda: smtp.rcpt(recipient)),
            ("DATA", lambda: smtp.data(data)),
        ]
        for command, step in steps:
            code, text = step()
            session.replies[command] = (code, text.decode())
            if code >= 400:
                break
        try:
            code, text = smtp.noop()
            session.replies["NOOP"] = (code, text.decode())
        except smtplib.SMTPServerDisconnected:
            session.closed = True
    finally:
        smtp.close()
    return session


def stays_false(check: Callable[[], bool], seconds: float = QUIET_PERIOD) -> bool:
    """Whether ``check()`` stays false for ``seconds`` (polled): for "not delivered"."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return False
        time.sleep(0.1)
    return not check()


def postfix_version() -> tuple[int, ...]:
    """The installed Postfix's version (``postconf -d mail_version``), e.g. (3, 7, 11)."""
    postconf = shutil.which("postconf") or str(Path(POSTFIX).with_name("postconf"))
    result = subprocess.run(  # noqa: S603 - our own fixed command line
        [postconf, "-dh", "mail_version"], capture_output=True, text=True, timeout=30, check=True
    )
    return tuple(int(part) for part in result.stdout.strip().split(".") if part.isdigit())


def skip_from_postfix(version: tuple[int, ...], why: str) -> None:
    installed = postfix_version()
    if installed >= version:
        pytest.skip(
            f"Postfix {'.'.join(map(str, installed))} is installed: {why}; this case asserts "
            "what earlier versions do"
        )


# --- Postfix ---------------------------------------------------------------------------------


def test_postfix_shutdown_at_mail_answers_421_and_closes(mta: Mta) -> None:
    recipient = f"rejected-{mta.transport}@example.org"
    with mta.milter(shutting_down("envfrom")):
        session = converse(mta.postfix.smtp_port, recipient, message("shutdown at MAIL"))
    assert session.reply("MAIL") == "421 4.7.0 Server closing connection"
    assert "RCPT" not in session.replies
    assert session.closed, f"the session is still open: {session.replies}"
    mta.postfix.wait_for_log(
        "NOQUEUE: milter-reject: MAIL from localhost[127.0.0.1]: "
        f"421 4.7.0 Server closing connection; from=<{SENDER}>"
    )
    assert stays_false(lambda: bool(mta.postfix.mailbox(f"rejected-{mta.transport}")))


def test_postfix_shutdown_at_end_of_message_is_sent_as_tempfail(mta: Mta) -> None:
    # Postfix up to 3.10 would tell the client "queued" and drop the message: milterapp
    # answers TempFail instead, and the client is told to come back.
    skip_from_postfix((3, 11), "it answers a shutdown at end of message with 421 itself")
    box = f"discarded-{mta.transport}"
    with mta.milter(shutting_down("eom")):
        session = converse(mta.postfix.smtp_port, f"{box}@example.org", message("shutdown at EOM"))
    assert session.reply("DATA") == "451 4.7.1 Service unavailable - try again later"
    assert not session.closed
    mta.postfix.wait_for_log("milter-reject: END-OF-MESSAGE from localhost[127.0.0.1]: 4.7.1")
    assert stays_false(lambda: bool(mta.postfix.mailbox(box)))


@pytest.fixture
def postfix_without_milter() -> Iterator[Postfix]:
    """A private Postfix whose milter is unreachable and whose default action is
    ``shutdown``: nothing listens on its milter port."""
    reason = postfix_available()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"end-to-end tests cannot run under CI: {reason}")
        pytest.skip(reason)
    root = Path(tempfile.mkdtemp(prefix="mta-", dir="/tmp"))  # Postfix's users get through
    root.chmod(0o755)
    postfix = Postfix(
        root=root / "postfix",
        milter=f"inet:127.0.0.1:{free_port()}",
        settings={"milter_default_action": "shutdown"},
    )
    try:
        postfix.start()  # runs `postfix check` first: it accepts the setting
        yield postfix
    finally:
        postfix.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_postfix_before_3_11_takes_default_action_shutdown_as_unknown(
    postfix_without_milter: Postfix,
) -> None:
    skip_from_postfix((3, 11), "it knows milter_default_action = shutdown (421, disconnect)")
    postfix = postfix_without_milter
    session = converse(postfix.smtp_port, "accepted-inet@example.org", message("no milter"))
    # Not a 421 and no disconnect: the reply of an unknown default action, for every command
    # of the session (EHLO passed: Postfix holds a CONNECT/HELO refusal until MAIL).
    assert session.reply("MAIL") == "451 4.3.5 Server configuration problem - try again later"
    assert not session.closed
    assert session.reply("NOOP") == "250 2.0.0 Ok"
    # Wait for the last line of the session: smtpd logs each refusal when it sends the reply, so
    # the warnings before it may be in the log while the MAIL line is not yet.
    log = postfix.wait_for_log(
        "NOQUEUE: milter-reject: MAIL from localhost[127.0.0.1]: "
        "451 4.3.5 Server configuration problem - try again later"
    )
    assert "warning: connect to Milter service inet:127.0.0.1:" in log
    assert "unrecognized default action: shutdown" in log


# --- Sendmail --------------------------------------------------------------------------------


def sendmail_queue_id(log: str, text: str) -> str:
    """The queue id on the syslog line that holds ``text`` (``sendmail[PID]: ID: text``)."""
    line = next(line for line in log.splitlines() if text in line)
    return line.split(text, 1)[0].rstrip().rstrip(":").rsplit(" ", 1)[1]


def test_sendmail_shutdown_is_sent_as_tempfail(sendmail_mta: SendmailMta) -> None:
    # Sendmail would take the reply for a broken filter (F= decides, and without a flag the
    # mail passes unfiltered): milterapp answers TempFail instead, at MAIL as at end of data.
    mta = sendmail_mta
    recipient = f"shutdown-mail-{mta.transport}@example.org"
    with mta.milter(shutting_down("envfrom")):
        session = converse(mta.smtp_port, recipient, message("shutdown at MAIL"))
    assert session.reply("MAIL") == "451 4.3.2 Please try again later"
    assert not session.closed
    recipient = f"shutdown-eom-{mta.transport}@example.org"
    with mta.milter(shutting_down("eom")):
        session = converse(mta.smtp_port, recipient, message("shutdown at EOM"))
    assert session.reply("DATA") == "451 4.3.2 Please try again later"
    log = mta.sendmail.syslog()
    assert "bogus response" not in log
    assert stays_false(lambda: bool(mta.sendmail.deliveries_to(recipient)))
