"""Fixtures for the end-to-end tests: a private Postfix per transport, milters in threads.

The tests skip (with the reason printed) only where Postfix is not installed; under CI
(``CI`` set) a missing Postfix fails them instead, since ``.ci/run`` installs it.
"""

from __future__ import annotations

import grp
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from milterapp.app import App
from milterapp.testing import ServerThread
from tests.e2e.common import free_port
from tests.e2e.opendkim import OpenDkim, opendkim_available
from tests.e2e.postfix import Postfix, postfix_available


@dataclass
class Mta:
    """A running private Postfix and the milter spec it calls."""

    postfix: Postfix
    milter_spec: str
    transport: str

    @contextmanager
    def milter(self, app: App, **options: Any) -> Iterator[ServerThread]:
        """Serve ``app`` where this Postfix expects its milter, for the block's duration."""
        if self.transport == "unix":
            # Postfix's smtpd runs as user postfix: the socket's group lets it connect.
            options.setdefault("unix_socket_group", "postfix")
        with ServerThread(app, self.milter_spec, **options) as server:
            yield server


def _skip_or_fail(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"end-to-end tests cannot run under CI: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session", params=["inet", "unix"])
def mta(request: pytest.FixtureRequest) -> Iterator[Mta]:
    """A private Postfix calling a milter over inet, then (second run) over a unix socket."""
    reason = postfix_available()
    if reason:
        _skip_or_fail(reason)
    transport: str = request.param
    root = Path(tempfile.mkdtemp(prefix="mta-", dir="/tmp"))  # short: unix path limit
    root.chmod(0o755)  # Postfix's daemons (users postfix and nobody) must get through
    try:
        if transport == "inet":
            port = free_port()
            milter_spec, postfix_spec = f"inet:{port}@[127.0.0.1]", f"inet:127.0.0.1:{port}"
        else:
            sockets = root / "milter"
            sockets.mkdir()
            os.chown(sockets, -1, grp.getgrnam("postfix").gr_gid)
            sockets.chmod(0o750)
            milter_spec = postfix_spec = f"unix:{sockets}/milter.sock"
        postfix = Postfix(root=root / "postfix", milter=postfix_spec)
        postfix.start()
        try:
            yield Mta(postfix, milter_spec, transport)
        finally:
            postfix.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def opendkim(request: pytest.FixtureRequest) -> Iterator[OpenDkim]:
    """A private OpenDKIM signing mail From: the senders' domain, over inet by default.

    ``@pytest.mark.parametrize("opendkim", ["unix"], indirect=True)`` gets one listening on a
    unix socket instead (tests/e2e/opendkim.py).
    """
    reason = opendkim_available()
    if reason:
        _skip_or_fail(reason)
    transport = getattr(request, "param", "inet")
    with OpenDkim(transport=transport) as signer:
        yield signer


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Print the Postfix log of a failed end-to-end test."""
    outcome = yield
    report = outcome.get_result()
    if report.failed and call.when == "call":
        mta = item.funcargs.get("mta") if hasattr(item, "funcargs") else None
        if isinstance(mta, Mta):
            report.sections.append(("postfix maillog", mta.postfix.log()[-20000:]))


@pytest.fixture(scope="session", params=["inet", "unix"])
def sendmail_mta(request: pytest.FixtureRequest) -> Iterator[Any]:
    """A private Sendmail 8.17 calling a milter over inet, then over a unix socket.

    Sendmail is unpacked, not installed (tests/e2e/sendmail.py); a failed test that used
    this fixture gets Sendmail's logs in its report.
    """
    from tests.e2e.sendmail import (
        Sendmail,
        SendmailLogReporter,
        SendmailMta,
        sendmail_available,
    )

    reason = sendmail_available()
    if reason:
        _skip_or_fail(reason)
    transport: str = request.param
    root = Path(tempfile.mkdtemp(prefix="sm-", dir="/tmp"))  # short: unix path limit
    try:
        if transport == "inet":
            port = free_port()
            milter_spec, sendmail_spec = f"inet:{port}@[127.0.0.1]", f"inet:{port}@127.0.0.1"
        else:
            path = root / "milter.sock"
            milter_spec, sendmail_spec = f"unix:{path}", f"local:{path}"
        sendmail = Sendmail(root=root / "sendmail", milter=sendmail_spec)
        sendmail.start()
        mta = SendmailMta(sendmail, milter_spec, transport)
        reporter = SendmailLogReporter(mta)
        request.config.pluginmanager.register(reporter)
        try:
            yield mta
        finally:
            request.config.pluginmanager.unregister(reporter)
            sendmail.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)
