"""SIGHUP under load, with a real Postfix: the reload hooks run, nothing is dropped or lost.

200 SMTP deliveries run at once through a private Postfix whose milter is a separate
``milterapp run`` process. While they run, the milter gets SIGHUP three times: its reload hook
swaps the header value it stamps. Every message is delivered exactly once, at the first try
(no temporary failure: no connection was dropped), stamped by the milter; the hook ran; and
the milter's log has no line about a lost or failed connection.
"""

from __future__ import annotations

import signal
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tests.e2e.conftest import Mta
from tests.e2e.test_restart import Milter, deliver

DELIVERIES = 200
RELOADS = 3
APP = textwrap.dedent(
    """
    from milterapp import Accept, App

    app = App("reloadable")
    state = {"generation": 0}

    @app.on_reload
    def swap():
        state["generation"] += 1

    @app.on("eom")
    def stamp(event, ctx):
        ctx.add_header("X-Generation", str(state["generation"]))
        ctx.log.info("stamped")
        return Accept()
    """
)


def test_sighup_under_load_runs_the_hooks_and_drops_nothing(mta: Mta, tmp_path: Path) -> None:
    (tmp_path / "restartapp.py").write_text(APP)  # the module name Milter runs
    box = f"reloaded-{mta.transport}"
    before = len(mta.postfix.mailbox(box))
    milter = Milter(mta, tmp_path)
    try:
        milter.wait_listening()
        with ThreadPoolExecutor(max_workers=DELIVERIES) as pool:
            codes = pool.map(lambda index: deliver(mta, index, "reloaded"), range(DELIVERIES))
            assert milter.enough.wait(60), "".join(milter.lines)  # 50 stamped: mid-load
            for _ in range(RELOADS):
                milter.process.send_signal(signal.SIGHUP)
            results = list(codes)
        assert results == [250] * DELIVERIES
        delivered = mta.postfix.wait_for_mail(box, before + DELIVERIES, timeout=60)[before:]
        ids = sorted(str(mail["Message-ID"]) for mail in delivered)
        assert ids == sorted(f"<reloaded-{index}@test.example>" for index in range(DELIVERIES))
        generations = {str(mail["X-Generation"]) for mail in delivered}
        assert "0" in generations  # stamped before the first reload
        assert generations - {"0"}  # ...and after one: the hook ran, its state was used
        assert milter.stop() == 0, "".join(milter.lines)
        log = "".join(milter.lines)
        assert "event=reload " in log
        for trouble in ("connection_lost", "connection_failed", "reload_failed", "error"):
            assert trouble not in log, log
    finally:
        if milter.process.poll() is None:
            milter.process.kill()
            milter.process.wait(timeout=30)
        milter.reader.join(timeout=30)
        if milter.process.stderr is not None:
            milter.process.stderr.close()
