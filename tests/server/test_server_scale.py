"""10,000 idle MTA connections: held in under 150 MB, and a new message is still served.

The milter runs as ``milterapp run`` in a child process (its memory is measured alone, from
/proc); this process opens the connections, each negotiated and then left idle, as Postfix
leaves connections between messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from milterapp.constants import ActionFlag, ProtocolFlag
from milterapp.events import Negotiate
from milterapp.protocol.codec import encode_command
from milterapp.replies import Accept, AddHeader
from milterapp.testing import MtaClient
from tests.server.support import run, send_message, start_session

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/PID/status")

CONNECTIONS = 10_000
RSS_LIMIT_MIB = 150
APP = textwrap.dedent(
    """
    from milterapp import Accept, App

    app = App("idle")

    @app.on("eom")
    def stamp(event, ctx):
        ctx.add_header("X-Served", "yes")
        return Accept()
    """
)
OFFER = encode_command(Negotiate(version=6, actions=ActionFlag.ALL, protocol=ProtocolFlag.ALL))


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS line")


def test_ten_thousand_idle_connections(tmp_path: Path) -> None:
    (tmp_path / "idleapp.py").write_text(APP)
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < CONNECTIONS + 1000:
        pytest.skip(f"needs {CONNECTIONS + 1000} file descriptors, the limit is {soft}")
    command = [
        sys.executable, "-m", "milterapp", "run", "idleapp:app",
        "--spec", "inet:0@[127.0.0.1]", "--max-connections", "0", "--backlog", "4096",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("LISTEN_")}
    env.pop("MILTERAPP_SPEC", None)
    server = subprocess.Popen(  # noqa: S603 - our own fixed command line
        command, cwd=tmp_path, stderr=subprocess.PIPE, text=True, env=env
    )
    try:
        assert server.stderr is not None
        port = 0
        for line in server.stderr:  # bounded: the process exits (EOF) if it cannot start
            if "event=listening" in line:
                port = int(line.split("listen=inet:")[1].split("@")[0])
                break
        assert port, "the milter did not start"
        # Keep reading its log, so that a full pipe never blocks the milter.
        threading.Thread(target=server.stderr.read, daemon=True).start()

        async def main() -> tuple[float, float]:
            idle: list[asyncio.StreamWriter] = []

            async def open_one() -> None:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                idle.append(writer)
                writer.write(OFFER)
                await reader.readexactly(4 + 13)  # the negotiation reply

            try:
                for _ in range(0, CONNECTIONS, 500):
                    await asyncio.gather(*(open_one() for _ in range(500)))
                held = rss_mib(server.pid)
                async with await MtaClient.connect(("127.0.0.1", port), timeout=10) as client:
                    await start_session(client)
                    answer = await send_message(client)
                    assert answer.verdict == Accept()
                    assert answer.modifications == [AddHeader(name="X-Served", value="yes")]
                return held, rss_mib(server.pid)
            finally:
                for writer in idle:
                    writer.close()

        held, after = run(main(), timeout=120)
        print(f"{CONNECTIONS} idle connections: {held:.0f} MiB RSS, {after:.0f} after a message")
        assert held < RSS_LIMIT_MIB
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 0
    finally:
        if server.poll() is None:
            server.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.wait(timeout=30)
        if server.stderr is not None:
            server.stderr.close()
