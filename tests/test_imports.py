"""A lean start-up: what ``import milterapp``, the command line and a serving process import.

A server process holds every module it imports for its whole life (and each forked worker a
share of it): the optional parts are imported when used, not at start-up. ``use_milter()``
imports the chain, ``--metrics`` prometheus_client and the standard library's HTTP server,
``--workers`` above 1 the worker supervisor, ``--syslog`` logging.handlers,
``ctx.message.as_email()`` the email package's parser; the testing kit, the load generator,
the demo and the command line are tools of their own. Serving messages imports nothing
(docs/performance.md, "Memory"). Each check runs in a fresh interpreter.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from milterapp.replies import AddHeader, Continue
from milterapp.testing import MtaClient
from tests.server.support import run, send_message, start_session

#: What a plain server does without: modules, or packages with everything under them.
OPTIONAL = (
    "milterapp.chain",
    "milterapp.testing",
    "milterapp.load",
    "milterapp.demo",
    "milterapp.cli",
    "milterapp.commands",
    "milterapp.server.workers",
    "milterapp.server.check",
    "prometheus_client",
    "http.server",
    "email.parser",
    "email.policy",
    "logging.handlers",
)


def _imported(code: str) -> set[str]:
    """The modules a fresh interpreter holds after running ``code``."""
    script = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    done = subprocess.run(  # noqa: S603 - our own interpreter and code
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    return set(json.loads(done.stdout.splitlines()[-1]))


def _optional_in(modules: set[str], allowed: tuple[str, ...] = ()) -> list[str]:
    return sorted(
        name
        for name in modules
        if any(name == part or name.startswith(f"{part}.") for part in OPTIONAL)
        and not any(name == part or name.startswith(f"{part}.") for part in allowed)
    )


def test_import_milterapp_leaves_out_the_optional_parts() -> None:
    modules = _imported("import milterapp")
    assert not _optional_in(modules)
    assert "uvloop" not in modules  # chosen when a server starts


def test_every_public_name_resolves_without_the_optional_parts() -> None:
    code = textwrap.dedent(
        """
        import milterapp
        missing = [name for name in milterapp.__all__ if not hasattr(milterapp, name)]
        assert not missing, missing
        from milterapp import *  # noqa: F403
        """
    )
    assert not _optional_in(_imported(code))


def test_an_app_and_its_server_leave_out_the_optional_parts() -> None:
    code = textwrap.dedent(
        """
        from milterapp import App, MilterServer
        app = App("lean")
        app.on("eom")(lambda event, ctx: None)
        server = MilterServer(app, spec="inet:0@[127.0.0.1]")
        """
    )
    assert not _optional_in(_imported(code))


def test_the_command_line_parses_run_without_the_chain_or_the_testing_kit() -> None:
    code = "import milterapp.cli as cli\ncli._parser().parse_args(['run', 'mymilter:app'])"
    modules = _imported(code)
    assert "milterapp.cli" in modules
    # The command line's own modules, and the load package: bench's flags come from LoadOptions.
    assert not _optional_in(
        modules, allowed=("milterapp.cli", "milterapp.commands", "milterapp.load")
    )


#: Served by app.run(); on each line on stdin, a thread prints the modules imported so far.
SERVED = textwrap.dedent(
    """
    import json
    import sys
    import threading

    from milterapp import App

    app = App("lean")

    @app.on("eom")
    def stamp(event, ctx):
        ctx.add_header("X-Lean", "yes")

    def report():
        for _ in sys.stdin:
            print(json.dumps(sorted(sys.modules)), flush=True)

    threading.Thread(target=report, daemon=True).start()
    app.run(sys.argv[1], argv=[], log_level="INFO")
    """
)


def test_a_serving_process_imports_nothing_optional_and_nothing_per_message(
    tmp_path: Path, sock_dir: Path
) -> None:
    script = tmp_path / "served.py"
    script.write_text(SERVED)
    path = sock_dir / "m.sock"
    env = {key: value for key, value in os.environ.items() if not key.startswith("LISTEN_")}
    child = subprocess.Popen(  # noqa: S603 - our own interpreter and script
        [sys.executable, str(script), f"unix:{path}"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert child.stdin is not None
    assert child.stdout is not None
    assert child.stderr is not None
    stdin, stdout = child.stdin, child.stdout

    def modules() -> set[str]:
        stdin.write("report\n")
        stdin.flush()
        return set(json.loads(stdout.readline()))

    async def messages() -> None:
        async with await MtaClient.connect(f"unix:{path}", timeout=5) as client:
            await start_session(client)
            for _ in range(3):
                answer = await send_message(client)
                assert answer.modifications == [AddHeader(name="X-Lean", value="yes")]
                assert answer.verdict == Continue()

    try:
        lines: list[str] = []
        while not any("listening" in line for line in lines):
            line = child.stderr.readline()
            assert line, f"the child exited before listening: {''.join(lines)}"
            lines.append(line)
        at_start = modules()
        assert not _optional_in(at_start)
        run(messages(), 30)
        assert modules() - at_start == set()  # nothing imported on the first messages
        child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=30) == 0
    finally:
        if child.poll() is None:
            child.kill()
        child.wait()
        for stream in (child.stdin, child.stdout, child.stderr):
            stream.close()
