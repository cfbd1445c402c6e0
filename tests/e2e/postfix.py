"""A private Postfix instance for end-to-end tests.

Everything lives in one temporary directory: configuration, queue, data, log and the
Maildirs it delivers to. It listens on free loopback ports and delivers only to
``*@example.org`` Maildirs (every other transport is ``error:``), so nothing leaves the
machine. It is always stopped with its own command.
"""

from __future__ import annotations

import email
import email.policy
import json
import os
import pwd
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import TypeVar

from tests.e2e.common import free_port, poll

T = TypeVar("T")

POSTFIX = shutil.which("postfix") or "/usr/sbin/postfix"
POSTQUEUE = shutil.which("postqueue") or "/usr/sbin/postqueue"
SASLPASSWD = shutil.which("saslpasswd2") or "/usr/sbin/saslpasswd2"
#: The SMTP AUTH account of the private instance (Cyrus SASL, sasldb).
AUTH_USER, AUTH_PASSWORD, AUTH_REALM = "alice", "s3cret-for-tests", "test.example"
DAEMON_DIRECTORY = "/usr/lib/postfix/sbin"
DOMAIN = "example.org"
#: The mailboxes at example.org, per transport suffix. virtual(8) allows no pattern
#: substitution in its maps, so every name the tests use is listed here.
MAILBOX_NAMES = (
    "accepted",
    "added",
    "archived",
    "authed",
    "body100",
    "body1048576",
    "changed",
    "chain-down",
    "chain-open",
    "chained",
    "counted1",
    "counted2",
    "counted3",
    "counted4",
    "deferred",
    "discarded",
    "exempt",
    "flaky",
    "full",
    "held",
    "inserted",
    "kept",
    "later",
    "load",
    "macros",
    "multiline",
    "obvious",
    "ops",
    "rejected",
    "reloaded",
    "removed",
    "reused",
    "sender",
    "several",
    "skipped",
    "slow",
    "workers",
)
TRANSPORTS = ("inet", "unix")


def postfix_available() -> str | None:
    """Return None if a private Postfix can run here, else the reason it cannot."""
    if not os.path.exists(POSTFIX) or not os.path.isdir(DAEMON_DIRECTORY):
        return "postfix is not installed (Debian package 'postfix'; .ci/run installs it)"
    if os.geteuid() != 0:
        return "a private Postfix instance needs root here (its daemons switch to 'postfix')"
    return None


def sasl_available() -> bool:
    """Whether SMTP AUTH can be set up (saslpasswd2 and the PLAIN mechanism installed)."""
    plugins = (
        "/usr/lib/x86_64-linux-gnu/sasl2",
        "/usr/lib/aarch64-linux-gnu/sasl2",
        "/usr/lib/sasl2",
    )
    has_plain = any(Path(d).glob("libplain.so*") for d in plugins if Path(d).is_dir())
    return os.path.exists(SASLPASSWD) and has_plain


@dataclass
class Postfix:
    """One private Postfix: ``start()``, send mail with smtplib, read what it did, ``stop()``.

    Args:
        root: an empty directory to hold everything.
        milter: the ``smtpd_milters`` value (Postfix syntax: ``inet:127.0.0.1:PORT``).
        settings: extra main.cf lines.
    """

    root: Path
    milter: str
    settings: dict[str, str] = field(default_factory=dict)
    smtp_port: int = field(default_factory=free_port)
    slow_port: int = field(default_factory=free_port)

    @property
    def config(self) -> Path:
        return self.root / "etc"

    @property
    def mail(self) -> Path:
        return self.root / "mail"

    @property
    def log_file(self) -> Path:
        return self.root / "maillog"

    def _main_cf(self) -> str:
        root = self.root
        settings = {
            "compatibility_level": "3.6",
            "queue_directory": f"{root}/queue",
            "data_directory": f"{root}/data",
            "daemon_directory": DAEMON_DIRECTORY,
            "command_directory": "/usr/sbin",
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "myhostname": "mx.test.example",
            "mydomain": "test.example",
            "myorigin": "$myhostname",
            "mydestination": "",
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "maillog_file": str(self.log_file),
            "maillog_file_prefixes": str(root),
            "alias_maps": "",
            "alias_database": "",
            "biff": "no",
            "smtputf8_enable": "no",
            "smtpd_banner": "$myhostname ESMTP",
            "smtpd_recipient_restrictions": "permit_mynetworks, reject_unauth_destination",
            "virtual_mailbox_domains": DOMAIN,
            "virtual_mailbox_base": str(self.mail),
            "virtual_mailbox_maps": f"texthash:{root}/etc/vmailbox",
            "virtual_uid_maps": "static:65534",
            "virtual_gid_maps": "static:65534",
            "virtual_mailbox_limit": "0",
            "message_size_limit": "20480000",
            "local_transport": "error:local delivery is disabled in tests",
            "relay_transport": "error:relay is disabled in tests",
            "default_transport": "error:outside delivery is disabled in tests",
            "smtpd_milters": self.milter,
            "milter_protocol": "6",
            "milter_default_action": "tempfail",
            "milter_connect_timeout": "10s",
            "milter_command_timeout": "10s",
            "milter_content_timeout": "30s",
            "default_process_limit": "300",
            "smtpd_client_connection_count_limit": "0",
            "smtpd_client_connection_rate_limit": "0",
            "in_flow_delay": "0",
            "queue_run_delay": "1s",
            "minimal_backoff_time": "1s",
            "maximal_backoff_time": "2s",
            "delay_warning_time": "0",
        }
        if sasl_available():
            settings.update(
                {
                    "smtpd_sasl_auth_enable": "yes",
                    "smtpd_sasl_type": "cyrus",
                    "smtpd_sasl_path": "smtpd",
                    "cyrus_sasl_config_path": f"{root}/etc/sasl",
                    "smtpd_sasl_local_domain": AUTH_REALM,
                }
            )
        settings.update(self.settings)
        return "".join(f"{key} = {value}\n" for key, value in settings.items())

    def _master_cf(self) -> str:
        services = [
            f"127.0.0.1:{self.smtp_port} inet n - n - - smtpd",
            # A second listener whose milter content timeout is short: the progress test.
            f"127.0.0.1:{self.slow_port} inet n - n - - smtpd -o milter_content_timeout=2s",
            "pickup unix n - n 60 1 pickup",
            "cleanup unix n - n - 0 cleanup",
            "qmgr unix n - n 300 1 qmgr",
            "rewrite unix - - n - - trivial-rewrite",
            "bounce unix - - n - 0 bounce",
            "defer unix - - n - 0 bounce",
            "trace unix - - n - 0 bounce",
            "verify unix - - n - 1 verify",
            "flush unix n - n 1000? 0 flush",
            "proxymap unix - - n - - proxymap",
            "proxywrite unix - - n - 1 proxymap",
            "smtp unix - - n - - smtp",
            "relay unix - - n - - smtp",
            "showq unix n - n - - showq",
            "error unix - - n - - error",
            "retry unix - - n - - error",
            "discard unix - - n - - discard",
            "local unix - n n - - local",
            "virtual unix - n n - - virtual",
            "lmtp unix - - n - - lmtp",
            "anvil unix - - n - 1 anvil",
            "scache unix - - n - 1 scache",
            "postlog unix-dgram n - n - 1 postlogd",
        ]
        return "\n".join(services) + "\n"

    def start(self) -> None:
        """Write the configuration and start the instance (``postfix -c DIR start``)."""
        self.config.mkdir(parents=True)
        for name in ("queue", "data"):
            (self.root / name).mkdir()
        postfix = pwd.getpwnam("postfix")
        os.chown(self.root / "data", postfix.pw_uid, postfix.pw_gid)
        self.mail.mkdir()
        os.chown(self.mail, 65534, 65534)
        self.root.chmod(0o755)
        (self.config / "main.cf").write_text(self._main_cf())
        (self.config / "master.cf").write_text(self._master_cf())
        boxes = [f"{name}-{transport}" for name in MAILBOX_NAMES for transport in TRANSPORTS]
        (self.config / "vmailbox").write_text(
            "".join(f"{box}@{DOMAIN} {DOMAIN}/{box}/\n" for box in boxes)
        )
        if sasl_available():
            self._set_up_sasl()
        self._postfix("check")
        self._postfix("start")

    def _set_up_sasl(self) -> None:
        sasl = self.config / "sasl"
        sasl.mkdir()
        database = sasl / "sasldb2"
        subprocess.run(  # noqa: S603 - our own fixed command line
            [SASLPASSWD, "-f", str(database), "-c", "-p", "-u", AUTH_REALM, AUTH_USER],
            input=AUTH_PASSWORD,
            text=True,
            check=True,
            timeout=30,
        )
        postfix = pwd.getpwnam("postfix")
        os.chown(database, postfix.pw_uid, postfix.pw_gid)
        (sasl / "smtpd.conf").write_text(
            f"pwcheck_method: auxprop\nauxprop_plugin: sasldb\nmech_list: PLAIN LOGIN\n"
            f"sasldb_path: {database}\n"
        )

    def stop(self) -> None:
        """Stop the instance with its own command (and wait for its master to go)."""
        self._postfix("stop", check=False)

    def _postfix(self, command: str, *, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(  # noqa: S603 - our own fixed command line
            [POSTFIX, "-c", str(self.config), command],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if check and result.returncode != 0:
            raise RuntimeError(
                f"postfix {command} failed ({result.returncode}):\n{result.stdout}"
                f"{result.stderr}\n--- maillog ---\n{self.log()}"
            )
        return result

    def log(self) -> str:
        """The instance's log so far."""
        try:
            return self.log_file.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log yet)"

    # --- reading back ----------------------------------------------------------------------

    def mailbox(self, user: str) -> list[EmailMessage]:
        """Messages delivered to ``user@example.org`` so far, oldest first."""
        new = self.mail / DOMAIN / user / "new"
        if not new.is_dir():
            return []
        files = sorted(new.iterdir(), key=lambda p: p.stat().st_mtime_ns)
        return [_parse(path.read_bytes()) for path in files]

    def raw_mailbox(self, user: str) -> list[bytes]:
        """Like :meth:`mailbox`, each message as virtual(8) wrote it (LF line ends, its
        ``Return-Path``, ``Delivered-To`` and ``X-Original-To`` on top)."""
        new = self.mail / DOMAIN / user / "new"
        if not new.is_dir():
            return []
        files = sorted(new.iterdir(), key=lambda p: p.stat().st_mtime_ns)
        return [path.read_bytes() for path in files]

    def wait_for_raw_mail(self, user: str, count: int = 1, timeout: float = 30.0) -> list[bytes]:
        """Like :meth:`wait_for_mail`, the raw bytes (:meth:`raw_mailbox`)."""
        return self._poll(
            lambda: self.raw_mailbox(user), count, timeout, f"{count} message(s) for {user}"
        )

    def wait_for_mail(self, user: str, count: int = 1, timeout: float = 30.0) -> list[EmailMessage]:
        """Poll the Maildir until ``count`` messages arrived (Postfix delivers asynchronously)."""
        return self._poll(
            lambda: self.mailbox(user), count, timeout, f"{count} message(s) for {user}"
        )

    def queue(self) -> list[dict[str, object]]:
        """Messages in the queue (``postqueue -j``), each a dict with ``queue_name``..."""
        result = subprocess.run(  # noqa: S603 - our own fixed command line
            [POSTQUEUE, "-c", str(self.config), "-j"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]

    def wait_for_queue(
        self, queue_name: str, count: int = 1, timeout: float = 30.0
    ) -> list[dict[str, object]]:
        """Poll until ``count`` messages sit in queue ``queue_name`` (e.g. ``hold``)."""

        def matching() -> list[dict[str, object]]:
            return [entry for entry in self.queue() if entry.get("queue_name") == queue_name]

        return self._poll(matching, count, timeout, f"{count} message(s) in the {queue_name} queue")

    def wait_for_log(self, text: str, timeout: float = 30.0) -> str:
        """Poll the log until it contains ``text``; return the log."""
        self._poll(lambda: [1] if text in self.log() else [], 1, timeout, f"{text!r} in the log")
        return self.log()

    def _poll(self, read: Callable[[], list[T]], count: int, timeout: float, what: str) -> list[T]:
        return poll(read, count, timeout, what, self.log)


def _parse(data: bytes) -> EmailMessage:
    message = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message
