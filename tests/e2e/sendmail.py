"""A private Sendmail 8.17 for end-to-end tests.

Sendmail is not installed on the machine (its Debian package conflicts with Postfix):
``.ci/run`` unpacks the packages ``sendmail-bin``, ``sendmail-base`` and ``sendmail-cf``
with ``dpkg-deb -x`` into ``$MILTERAPP_SENDMAIL_ROOT`` (default ``/opt/milterapp-sendmail``).

Everything the instance writes lives in one temporary directory: its ``sendmail.cf``
(generated with m4 from the unpacked ``cf/`` tree), queue, pid and status files, the SMTP
traffic log (``-X``) and its syslog. It runs as a foreground daemon (``-bD``) owned by the
fixture and stopped with SIGTERM (Sendmail has no private stop command).

It runs inside private mount and UTS namespaces (``unshare --mount --uts``), where a
wrapper script sets a qualified host name, bind-mounts its own ``/etc/hosts``,
``/etc/nsswitch.conf`` (files only) and ``/etc/resolv.conf`` (a loopback name server where
none listens), and its own ``/dev`` whose ``/dev/log`` is the sink's syslog socket.
Without that, Sendmail waits 60 s at start on a machine whose host name is not fully
qualified, sends DNS queries off the machine (IPv6 lookups of its own host name, whose
time-outs stalled a burst of deliveries for 30 s), and logs nowhere. Nothing of the machine is
changed: no ``/etc/mail``, no ``/var/spool/mqueue``, no host name.

It relays every message to :class:`~tests.e2e.smtpsink.SmtpSink` (``SMART_HOST``), where
the tests read back the envelope and the content Sendmail delivered.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any, TypeVar

import pytest

from milterapp.app import App
from milterapp.testing import ServerThread
from tests.e2e.common import free_port, poll
from tests.e2e.smtpsink import Delivery, SmtpSink

#: Where .ci/run unpacks the Sendmail packages.
SENDMAIL_ROOT = Path(os.environ.get("MILTERAPP_SENDMAIL_ROOT", "/opt/milterapp-sendmail"))
HOSTNAME = "mx.test.example"
SINK_HOSTNAME = "sink.test.example"
#: The two input filters: the same milter, with normal and with short timeouts.
MAIN_FILTER, SLOW_FILTER = "main", "slow"
#: Sendmail's milter timeouts per filter (T=): connect, send, read, end of message total.
MAIN_TIMEOUTS = "C:10s;S:30s;R:30s;E:60s"
SLOW_TIMEOUTS = "C:10s;S:30s;R:2s;E:5s"
T = TypeVar("T")


def binary(root: Path = SENDMAIL_ROOT) -> Path:
    return root / "usr/libexec/sendmail/sendmail"


def cf_dir(root: Path = SENDMAIL_ROOT) -> Path:
    return root / "usr/share/sendmail/cf"


def sendmail_available() -> str | None:
    """Return None if a private Sendmail can run here, else the reason it cannot."""
    if not binary().exists() or not (cf_dir() / "m4/cf.m4").exists():
        return (
            f"Sendmail is not unpacked in {SENDMAIL_ROOT} (set MILTERAPP_SENDMAIL_ROOT; "
            ".ci/run unpacks sendmail-bin, sendmail-base and sendmail-cf there)"
        )
    for tool in ("m4", "unshare", "mount", "hostname"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (needed to configure and run a private Sendmail)"
    if os.geteuid() != 0:
        return "a private Sendmail needs root here (namespaces, bind mounts, port binding)"
    return None


@dataclass
class Sendmail:
    """One private Sendmail: ``start()``, send mail with smtplib, read what it did, ``stop()``.

    Args:
        root: an empty directory to hold everything.
        milter: the filter's socket in Sendmail's syntax (``inet:PORT@127.0.0.1``,
            ``local:/path``).
    """

    root: Path
    milter: str
    smtp_port: int = field(default_factory=free_port)
    #: A second listener whose filter has short timeouts (R:2s, E:5s): the progress tests.
    slow_port: int = field(default_factory=free_port)
    sink: SmtpSink = field(init=False)
    _process: subprocess.Popen[bytes] | None = field(default=None, init=False)

    @property
    def cf(self) -> Path:
        return self.root / "sendmail.cf"

    @property
    def queue(self) -> Path:
        return self.root / "queue"

    @property
    def traffic_file(self) -> Path:
        return self.root / "traffic.log"

    @property
    def syslog_file(self) -> Path:
        return self.root / "syslog.log"

    @property
    def console_file(self) -> Path:
        return self.root / "console.log"

    def _mc(self) -> str:
        root, sink = self.root, self.sink.port
        filter_options = f"S={self.milter}, F=T"
        lines = [
            "divert(-1)",
            "divert(0)dnl",
            "OSTYPE(`linux')dnl",
            "FEATURE(`no_default_msa')dnl",
            "FEATURE(`nocanonify')dnl",
            # No DNS here: sender domains such as test.example resolve nowhere.
            "FEATURE(`accept_unresolvable_domains')dnl",
            f"define(`MAIL_SETTINGS_DIR', `{root}/etc/')dnl",
            f"define(`confDOMAIN_NAME', `{HOSTNAME}')dnl",
            f"define(`QUEUE_DIR', `{self.queue}')dnl",
            f"define(`STATUS_FILE', `{root}/sendmail.st')dnl",
            f"define(`confPID_FILE', `{root}/sendmail.pid')dnl",
            "define(`confHOST_STATUS_DIRECTORY', `')dnl",
            f"define(`confDEAD_LETTER_DROP', `{root}/dead.letter')dnl",
            f"define(`HELP_FILE', `{root}/etc/helpfile')dnl",
            f"define(`confSERVICE_SWITCH_FILE', `{root}/etc/service.switch')dnl",
            f"define(`confHOSTS_FILE', `{root}/etc/hosts')dnl",
            "define(`ALIAS_FILE', `')dnl",
            f"define(`confCW_FILE', `-o {root}/etc/local-host-names')dnl",
            f"define(`confCT_FILE', `-o {root}/etc/trusted-users')dnl",
            f"define(`confCR_FILE', `-o {root}/etc/relay-domains')dnl",
            "define(`confUSERDB_SPEC', `')dnl",
            "define(`confERROR_MESSAGE', `')dnl",
            "define(`confDOUBLE_BOUNCE_ADDRESS', `')dnl",
            # Everything is under /tmp, which is world-writable: Sendmail refuses such
            # paths (the milter's unix socket, for one) unless it may trust the sticky bit.
            "define(`confDONT_BLAME_SENDMAIL', `TrustStickyBit')dnl",
            "define(`confDELIVERY_MODE', `background')dnl",
            "define(`confMAX_DAEMON_CHILDREN', `0')dnl",
            "define(`confCONNECTION_RATE_THROTTLE', `0')dnl",
            "define(`confQUEUE_LA', `100')dnl",
            "define(`confREFUSE_LA', `100')dnl",
            "define(`confDELAY_LA', `0')dnl",
            "define(`confMIN_FREE_BLOCKS', `0')dnl",
            "define(`confLOG_LEVEL', `14')dnl",
            "define(`confMILTER_LOG_LEVEL', `14')dnl",
            "define(`confTO_IDENT', `0s')dnl",
            "define(`confPRIVACY_FLAGS', `authwarnings')dnl",
            "define(`confAUTH_MECHANISMS', `')dnl",
            # The default macro lists, plus {client_addr} where the tests look for it.
            "define(`confMILTER_MACROS_CONNECT', "
            "``j, _, {daemon_name}, {if_name}, {if_addr}, {client_addr}'')dnl",
            # The sink, by a name that our hosts file maps to 127.0.0.1: Sendmail counts
            # [127.0.0.1] as itself (class w) and would then skip the smart host.
            f"define(`SMART_HOST', `[{SINK_HOSTNAME}]')dnl",
            "define(`confDONT_PROBE_INTERFACES', `True')dnl",
            f"define(`RELAY_MAILER_ARGS', `TCP $h {sink}')dnl",
            f"define(`ESMTP_MAILER_ARGS', `TCP $h {sink}')dnl",
            f"define(`SMTP_MAILER_ARGS', `TCP $h {sink}')dnl",
            f"DAEMON_OPTIONS(`Port={self.smtp_port}, Addr=127.0.0.1, Name=MTA-test, Listen=256, "
            f"InputMailFilters={MAIN_FILTER}')dnl",
            f"DAEMON_OPTIONS(`Port={self.slow_port}, Addr=127.0.0.1, Name=MTA-slow, Listen=256, "
            f"InputMailFilters={SLOW_FILTER}')dnl",
            f"INPUT_MAIL_FILTER(`{MAIN_FILTER}', `{filter_options}, T={MAIN_TIMEOUTS}')dnl",
            f"MAIL_FILTER(`{SLOW_FILTER}', `{filter_options}, T={SLOW_TIMEOUTS}')dnl",
            "MAILER(`local')dnl",
            "MAILER(`smtp')dnl",
        ]
        return "\n".join(lines) + "\n"

    def _wrapper(self) -> str:
        # Run in private mount and UTS namespaces: a qualified host name; our hosts file,
        # name service switch (files only) and resolver configuration (a loopback name
        # server where none listens), so that no lookup leaves the machine; and a /dev of
        # our own whose log socket is the sink's (Sendmail logs only via syslog).
        root = self.root
        devices = " ".join(("null", "zero", "full", "random", "urandom", "tty"))
        return f"""#!/bin/sh
set -e
hostname {HOSTNAME}
for name in hosts nsswitch.conf resolv.conf; do
    if [ -e /etc/$name ]; then mount --bind {root}/etc/$name /etc/$name; fi
done
mkdir -p {root}/dev
for name in {devices}; do
    : > {root}/dev/$name
    mount --bind /dev/$name {root}/dev/$name
done
ln -sf {root}/syslog.sock {root}/dev/log
mount --rbind {root}/dev /dev
exec "$@"
"""

    def _namespaced(self, *argv: str) -> list[str]:
        return ["unshare", "--mount", "--uts", "--propagation", "private", "--", "/bin/sh",
                str(self.root / "wrapper.sh"), *argv]  # fmt: skip

    def start(self, timeout: float = 30.0) -> None:
        """Write the configuration, start the daemon and wait until it accepts connections."""
        self.sink = SmtpSink(syslog_socket=self.root / "syslog.sock", syslog_file=self.syslog_file)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self.sink.start()  # first: the configuration names its port
            self._configure()
            self._launch(timeout)
        except BaseException:
            self.stop()
            raise

    def _configure(self) -> None:
        root = self.root
        for name in ("etc", "queue"):
            (root / name).mkdir(parents=True)
        root.chmod(0o755)
        self.queue.chmod(0o700)
        etc = root / "etc"
        (etc / "hosts").write_text(
            f"127.0.0.1 localhost {HOSTNAME} {SINK_HOSTNAME}\n::1 localhost\n"
        )
        (etc / "nsswitch.conf").write_text("hosts: files\nnetworks: files\n")
        (etc / "resolv.conf").write_text("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")
        (etc / "service.switch").write_text("hosts files\naliases files\n")
        for name in ("helpfile", "local-host-names", "trusted-users", "relay-domains"):
            (etc / name).write_text("")
        (root / "sendmail.st").write_text("")  # statistics: kept only if the file exists
        (root / "sendmail.mc").write_text(self._mc())
        (root / "wrapper.sh").write_text(self._wrapper())
        m4 = [
            "m4",
            f"-D_CF_DIR_={cf_dir()}/",
            str(cf_dir() / "m4/cf.m4"),
            str(root / "sendmail.mc"),
        ]
        with self.cf.open("w") as cf:
            subprocess.run(m4, stdout=cf, check=True, timeout=30)  # noqa: S603 - fixed command

    def _launch(self, timeout: float) -> None:
        command = self._namespaced(
            str(binary()), "-C", str(self.cf), "-bD", "-X", str(self.traffic_file)
        )
        with self.console_file.open("wb") as console:
            self._process = subprocess.Popen(  # noqa: S603 - our own fixed command line
                command, stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + timeout
        for port, name in ((self.smtp_port, "MTA-test"), (self.slow_port, "MTA-slow")):
            while not _accepts(port):
                if self._process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"sendmail did not start:\n{self.log()}")
                time.sleep(0.05)
            # Each probe is an SMTP session whose Sendmail process calls the milter; wait
            # until it has ended, so that no test's milter sees it.
            self.wait_for_log(f"did not issue MAIL/EXPN/VRFY/ETRN during connection to {name}")

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the daemon with SIGTERM and wait for it; then stop the sink."""
        process, self._process = self._process, None
        if process is not None:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout)
        self.sink.stop()

    def log(self) -> str:
        """Sendmail's console output, syslog and SMTP traffic log so far."""
        parts = []
        for title, path in (
            ("console", self.console_file),
            ("syslog", self.syslog_file),
            ("smtp traffic (-X)", self.traffic_file),
        ):
            try:
                text = path.read_text(errors="replace")
            except FileNotFoundError:
                text = "(none yet)"
            parts.append(f"--- sendmail {title} ---\n{text[-15000:]}")
        return "\n".join(parts)

    def syslog(self) -> str:
        try:
            return self.syslog_file.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # --- reading back ----------------------------------------------------------------------

    def deliveries_to(self, recipient: str) -> list[Delivery]:
        """What the sink received for ``recipient`` so far, oldest first."""
        return [d for d in self.sink.deliveries if recipient in d.recipients]

    def wait_for_mail(
        self, recipient: str, count: int = 1, timeout: float = 30.0
    ) -> list[EmailMessage]:
        """Poll until ``count`` messages for ``recipient`` reached the sink; return them."""
        found = self._poll(
            lambda: self.deliveries_to(recipient), count, timeout, f"{count} for {recipient}"
        )
        return [delivery.message() for delivery in found]

    def wait_for_deliveries(
        self, recipient: str, count: int = 1, timeout: float = 30.0
    ) -> list[Delivery]:
        """Like :meth:`wait_for_mail`, with the envelope."""
        return self._poll(
            lambda: self.deliveries_to(recipient), count, timeout, f"{count} for {recipient}"
        )

    def wait_for_log(self, text: str, timeout: float = 30.0) -> str:
        """Poll Sendmail's syslog until it contains ``text``; return the log."""
        self._poll(lambda: [1] if text in self.syslog() else [], 1, timeout, repr(text))
        return self.syslog()

    def quarantined(self) -> list[dict[str, str]]:
        """Quarantined queue files (``hf*``): queue id, reason (``q`` line), recipients."""
        entries = []
        for path in sorted(self.queue.glob("hf*")):
            lines = path.read_text(errors="replace").splitlines()
            entries.append(
                {
                    "id": path.name[2:],
                    "reason": next((ln[1:] for ln in lines if ln.startswith("q")), ""),
                    "recipients": " ".join(
                        ln.split(":", 1)[-1] for ln in lines if ln.startswith("R")
                    ),
                }
            )
        return entries

    def wait_for_quarantine(self, count: int = 1, timeout: float = 30.0) -> list[dict[str, str]]:
        return self._poll(self.quarantined, count, timeout, f"{count} quarantined message(s)")

    def mailq_quarantine(self) -> str:
        """Sendmail's own listing of its quarantine (``mailq -qQ``, i.e. ``-bp -qQ``)."""
        result = subprocess.run(  # noqa: S603 - our own fixed command line
            self._namespaced(str(binary()), "-C", str(self.cf), "-bp", "-qQ"),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        return result.stdout + result.stderr

    def _poll(self, read: Callable[[], list[T]], count: int, timeout: float, what: str) -> list[T]:
        return poll(read, count, timeout, what, self.log)


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


@dataclass
class SendmailMta:
    """A running private Sendmail and the milter spec (ours) its filters call."""

    sendmail: Sendmail
    milter_spec: str
    transport: str

    @property
    def smtp_port(self) -> int:
        return self.sendmail.smtp_port

    def milter(self, app: App, **options: Any) -> ServerThread:
        """Serve ``app`` where this Sendmail expects its milter, for the block's duration.

        Sendmail runs as root and connects to a unix socket as root: no group needed.
        """
        return ServerThread(app, self.milter_spec, **options)


class SendmailLogReporter:
    """A pytest plugin (registered by the ``sendmail_mta`` fixture): adds the Sendmail logs
    to the report of a failed test that used that fixture."""

    def __init__(self, mta: SendmailMta) -> None:
        self.mta = mta

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(
        self, item: pytest.Item, call: pytest.CallInfo[None]
    ) -> Generator[None, Any, None]:
        outcome = yield
        report = outcome.get_result()
        funcargs = getattr(item, "funcargs", {})
        if report.failed and call.when == "call" and funcargs.get("sendmail_mta") is self.mta:
            report.sections.append(("sendmail logs", self.mta.sendmail.log()))
