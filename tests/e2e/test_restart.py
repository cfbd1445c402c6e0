"""Nothing is lost when the milter restarts under load, with a real Postfix.

200 SMTP deliveries run at once through a private Postfix whose milter is a separate
``milterapp run`` process. After 50 messages were stamped, the milter gets SIGTERM: it drains
and exits 0, and a new one starts on the same socket. Postfix answers a message it could not
check with a temporary failure (``milter_default_action = tempfail``); the sender tries again
later, as a real one would. At the end every message is delivered exactly once, and every
delivered message carries the milter's header: none went through unchecked.
"""

from __future__ import annotations

import os
import signal
import smtplib
import subprocess
import sys
import textwrap
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tests.e2e.common import message
from tests.e2e.conftest import Mta

DELIVERIES = 200
RESTART_AFTER = 50
APP = textwrap.dedent(
    """
    import os

    from milterapp import Accept, App

    app = App("restartable")

    @app.on("eom")
    def stamp(event, ctx):
        ctx.add_header("X-Milter", str(os.getpid()))
        ctx.log.info("stamped")
        return Accept()
    """
)


class Milter:
    """One ``milterapp run`` process, its stderr read line by line in a thread."""

    def __init__(
        self, mta: Mta, directory: Path, target: str = "restartapp:app", *options: str
    ) -> None:
        command = [sys.executable, "-m", "milterapp", "run", target, *options]
        command += ["--spec", mta.milter_spec, "--shutdown-grace", "20"]
        if mta.transport == "unix":
            command += ["--unix-socket-group", "postfix"]
        env = {k: v for k, v in os.environ.items() if not k.startswith("LISTEN_")}
        env.pop("MILTERAPP_SPEC", None)
        self.process = subprocess.Popen(  # noqa: S603 - our own fixed command line
            command, cwd=directory, stderr=subprocess.PIPE, text=True, env=env
        )
        self.lines: list[str] = []
        self.stamped = 0
        self.listening = threading.Event()
        self.enough = threading.Event()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line)
            if "event=listening" in line or '"event": "listening"' in line:
                self.listening.set()
            elif "event=stamped" in line:
                self.stamped += 1
                if self.stamped >= RESTART_AFTER:
                    self.enough.set()
        self.listening.set()  # end of file: do not wait for ever
        self.enough.set()

    def wait_listening(self) -> None:
        assert self.listening.wait(30), "".join(self.lines)
        assert self.process.poll() is None, "".join(self.lines)

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        status = self.process.wait(timeout=60)
        self.reader.join(timeout=30)
        return status

    def close(self) -> None:
        """Kill the process if it still runs, and close its stderr."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)
        self.reader.join(timeout=30)
        if self.process.stderr is not None:
            self.process.stderr.close()


def deliver(mta: Mta, index: int, box: str = "load") -> int:
    """Send message ``index`` (Message-ID ``<BOX-INDEX@test.example>``) to mailbox ``box``;
    return Postfix's SMTP reply code to it."""
    body = message(f"{box} {index}", **{"Message-ID": f"<{box}-{index}@test.example>"})
    with smtplib.SMTP("127.0.0.1", mta.postfix.smtp_port, timeout=60) as smtp:
        try:
            smtp.sendmail("sender@test.example", [f"{box}-{mta.transport}@example.org"], body)
        except smtplib.SMTPResponseException as exc:
            return exc.smtp_code
        except smtplib.SMTPRecipientsRefused as exc:
            return next(iter(exc.recipients.values()))[0]
    return 250


def try_deliver(mta: Mta, index: int) -> int:
    """:func:`deliver`; a dropped SMTP connection counts as a temporary failure (421)."""
    try:
        return deliver(mta, index)
    except (smtplib.SMTPServerDisconnected, ConnectionError):
        return 421


def test_a_restart_under_load_loses_nothing(mta: Mta, tmp_path: Path) -> None:
    (tmp_path / "restartapp.py").write_text(APP)
    box = f"load-{mta.transport}"
    before = len(mta.postfix.mailbox(box))
    first = Milter(mta, tmp_path)
    second: Milter | None = None
    try:
        first.wait_listening()
        with ThreadPoolExecutor(max_workers=DELIVERIES) as pool:
            codes = pool.map(lambda index: try_deliver(mta, index), range(DELIVERIES))
            assert first.enough.wait(60), "".join(first.lines)
            assert first.stop() == 0, "".join(first.lines)  # drained, exit 0
            second = Milter(mta, tmp_path)
            second.wait_listening()
            results = dict(zip(range(DELIVERIES), codes, strict=True))
        refused = [index for index, code in results.items() if code != 250]
        assert all(400 <= results[index] < 500 for index in refused), results  # never 5xx
        # The sender tries the deferred ones again, once the milter is back.
        for _ in range(5):
            refused = [index for index in refused if try_deliver(mta, index) != 250]
            if not refused:
                break
        assert not refused, f"still refused: {refused}"
        delivered = mta.postfix.wait_for_mail(box, before + DELIVERIES, timeout=60)[before:]
        ids = sorted(str(mail["Message-ID"]) for mail in delivered)
        assert ids == sorted(f"<load-{index}@test.example>" for index in range(DELIVERIES))
        unchecked = [str(mail["Message-ID"]) for mail in delivered if not mail["X-Milter"]]
        assert unchecked == []
        assert second.stop() == 0, "".join(second.lines)
        deferred = sum(1 for code in results.values() if code != 250)
        print(
            f"{mta.transport}: {DELIVERIES} deliveries, {deferred} deferred during the restart "
            f"and delivered later; milter 1 stamped {first.stamped}"
        )
    finally:
        for milter in (first, second):
            if milter is not None:
                milter.close()
