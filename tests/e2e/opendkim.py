"""A private OpenDKIM signer for end-to-end tests, and a DKIM check that needs no DNS.

:class:`OpenDkim` generates a key pair with ``opendkim-genkey`` in a temporary directory,
writes a configuration there and runs ``opendkim -f -x CONF`` in the foreground, listening
on a free loopback port (or a unix socket): a real milter to put behind ours, or to drive
with the testing kit. It only signs (``Mode s``), so it never looks anything up in DNS.

:meth:`OpenDkim.verify` checks a delivered message with dkimpy, which gets the public key
from :meth:`OpenDkim.txt_record` instead of DNS. Why a check failed is logged (:data:`LOG`,
level ERROR); pytest shows that log for a failed test.

Requires the Debian packages ``opendkim`` and ``opendkim-tools`` (``.ci/run`` installs
them) and the Python package ``dkimpy`` (the ``test`` extra).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Literal, Self

from tests.e2e.common import SENDER, free_port

OPENDKIM = shutil.which("opendkim") or "/usr/sbin/opendkim"
GENKEY = shutil.which("opendkim-genkey") or "/usr/sbin/opendkim-genkey"
#: The domain signed by default: the one of the e2e tests' sender (tests/e2e/common.py).
DOMAIN = SENDER.rpartition("@")[2]
SELECTOR = "e2e"
#: Seconds to wait for OpenDKIM to listen, and then to exit once told to stop.
START_TIMEOUT = STOP_TIMEOUT = 15.0
#: Where dkimpy says why a signature did not verify (pytest shows it for a failed test).
LOG = logging.getLogger(__name__)


def opendkim_available() -> str | None:
    """Return None if a private OpenDKIM can run here, else the reason it cannot."""
    if not (os.access(OPENDKIM, os.X_OK) and os.access(GENKEY, os.X_OK)):
        return (
            "opendkim is not installed (Debian packages 'opendkim' and 'opendkim-tools'; "
            ".ci/run installs them)"
        )
    if importlib.util.find_spec("dkim") is None:
        return "dkimpy is not installed (pip install -e '.[test]')"
    return None


class OpenDkim:
    """One private OpenDKIM signing for ``domain`` (use ``with``, or ``start()``/``stop()``).

    Args:
        domain: the domain it signs mail from (``From:`` header); others pass unsigned.
        selector: the DKIM selector (``s=``) of the generated key.
        transport: ``"inet"`` (a free port on 127.0.0.1) or ``"unix"`` (a socket in the
            temporary directory).
        settings: extra or overriding opendkim.conf(5) settings, such as
            ``{"Canonicalization": "relaxed/relaxed"}``.

    Attributes:
        spec: where it listens, set by :meth:`start`, as a milterapp connection spec
            (``inet:PORT@[127.0.0.1]``, ``unix:/path``): a ``target`` for the testing kit's
            clients, or an upstream milter's address.
        root: the temporary directory (key, configuration, pid file, output), made by
            :meth:`start` and removed by :meth:`stop`.
    """

    def __init__(
        self,
        domain: str = DOMAIN,
        *,
        selector: str = SELECTOR,
        transport: Literal["inet", "unix"] = "inet",
        settings: Mapping[str, str] | None = None,
    ) -> None:
        self.domain = domain
        self.selector = selector
        self.transport = transport
        self.settings = dict(settings or {})
        self.spec = ""
        self._root: Path | None = None
        self._socket = ""
        self._address: tuple[str, int] | str = ""
        self._process: subprocess.Popen[bytes] | None = None
        self._record: bytes | None = None
        self._output_text = ""

    @property
    def root(self) -> Path:
        if self._root is None:
            raise RuntimeError("OpenDkim is not started")
        return self._root

    @property
    def key_name(self) -> bytes:
        """The DNS name dkimpy looks the public key up at (``selector._domainkey.domain.``)."""
        return f"{self.selector}._domainkey.{self.domain}.".encode()

    def start(self) -> None:
        """Generate the key, write the configuration, start OpenDKIM and wait until it listens."""
        self._root = Path(tempfile.mkdtemp(prefix="odkim-", dir="/tmp"))  # short: unix path limit
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        if self.transport == "inet":
            port = free_port()
            self.spec, self._socket = f"inet:{port}@[127.0.0.1]", f"inet:{port}@127.0.0.1"
            self._address = ("127.0.0.1", port)
        else:
            path = self.root / "opendkim.sock"
            self.spec, self._socket = f"unix:{path}", f"local:{path}"
            self._address = str(path)
        # The private key is written 0600 for the current user; RequireSafeKeys stays off
        # because it also refuses every parent directory others may write to, /tmp included.
        _run([GENKEY, "-D", str(self.root), "-d", self.domain, "-s", self.selector])
        self._record = _txt_record((self.root / f"{self.selector}.txt").read_text())
        config = self.root / "opendkim.conf"
        config.write_text("".join(f"{name} {value}\n" for name, value in self._config().items()))
        _run([OPENDKIM, "-n", "-x", str(config)])  # reports configuration errors plainly
        output = (self.root / "output").open("wb")
        with output:
            self._process = subprocess.Popen(  # noqa: S603 - our own fixed command line
                [OPENDKIM, "-f", "-x", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
            )
        self._wait_listening()

    def _config(self) -> dict[str, str]:
        config = {
            # Signing only: verifying would look keys up in DNS.
            "Mode": "s",
            "Domain": self.domain,
            "Selector": self.selector,
            "KeyFile": str(self.root / f"{self.selector}.private"),
            "RequireSafeKeys": "false",
            "Socket": self._socket,
            # The default list is 127.0.0.1 alone; clients on loopback get signed, as with a
            # Postfix fed by smtplib on 127.0.0.1.
            "InternalHosts": "127.0.0.0/8,::1",
            "Background": "no",
            "Syslog": "no",
            "PidFile": str(self.root / "opendkim.pid"),
        }
        return {**config, **self.settings}

    def _wait_listening(self) -> None:
        # OpenDKIM says nothing when it is ready: a connection that succeeds is the signal.
        # libmilter takes a connection that closes before negotiating as a client gone.
        assert self._process is not None
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self._process.poll() is not None:
                raise RuntimeError(
                    f"opendkim exited ({self._process.returncode}) before listening:\n"
                    f"{self.output()}"
                )
            if self._listening():
                return
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"opendkim did not listen at {self.spec} within {START_TIMEOUT} s:\n"
                    f"{self.output()}"
                )
            time.sleep(0.02)

    def _listening(self) -> bool:
        family = socket.AF_UNIX if isinstance(self._address, str) else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.settimeout(1.0)
            try:
                probe.connect(self._address)
            except OSError:
                return False
        return True

    def stop(self) -> None:
        """Stop OpenDKIM (SIGTERM, SIGKILL after STOP_TIMEOUT) and remove its directory."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            deadline = time.monotonic() + STOP_TIMEOUT
            while True:
                # libmilter's accept loop checks for a stop request only when select()
                # returns: every 5 s (MI_CHK_TIME), or at once for a connection.
                self._listening()
                try:
                    process.wait(0.05)
                    break
                except subprocess.TimeoutExpired:
                    if time.monotonic() > deadline:
                        process.kill()
                        process.wait(STOP_TIMEOUT)
                        break
        root, self._root = self._root, None
        if root is not None:
            self._output_text = _read(root / "output")
            shutil.rmtree(root, ignore_errors=True)

    def output(self) -> str:
        """What OpenDKIM wrote to stdout and stderr (it has no log without syslog)."""
        text = self._output_text if self._root is None else _read(self._root / "output")
        return text or "(no output)"

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # --- checking signatures -------------------------------------------------------------

    def txt_record(self, name: bytes, timeout: float = 5) -> bytes | None:
        """dkimpy's ``dnsfunc``: the generated key's TXT record at :attr:`key_name`, else
        nothing (never a real DNS query)."""
        return self._record if name.lower() == self.key_name.lower() else None

    def verify(self, message: bytes) -> bool:
        """Whether the first ``DKIM-Signature`` of ``message`` (raw bytes, CRLF or LF) is
        valid for the generated key; False if there is none."""
        import dkim  # type: ignore[import-untyped]  # dkimpy has no type hints

        result: bool = dkim.verify(message, logger=LOG, dnsfunc=self.txt_record)
        return result


def _run(command: list[str]) -> None:
    result = subprocess.run(  # noqa: S603 - our own fixed command line
        command, capture_output=True, text=True, timeout=60, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(
            f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout}{result.stderr}"
        )


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def _txt_record(zone_line: str) -> bytes:
    # opendkim-genkey writes a zone file line: NAME IN TXT ( "part" "part" ) ; comment.
    # The record is the quoted strings inside the parentheses, joined.
    parts = re.findall(r'"([^"]*)"', zone_line.partition(")")[0])
    if not parts:
        raise RuntimeError(f"no TXT record in opendkim-genkey's output: {zone_line!r}")
    return "".join(parts).encode()
