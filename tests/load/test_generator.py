"""The load generator (milterapp.load.generator, ``milterapp bench``) against real servers.

Runs are bounded by a number of messages, never by time: the tests check counts and answers,
not speed.
"""

from __future__ import annotations

import json
import socket
import struct
import threading
from pathlib import Path
from typing import Any

import pytest

from milterapp import Accept, App, Reject, TempFail
from milterapp.cli import main
from milterapp.events import EndOfMessage, EnvRcpt
from milterapp.load import LoadOptions, run_load
from milterapp.server.logsetup import configure_logging
from milterapp.testing import ServerThread


def stamping_app(*, eom_only: bool = False) -> App:
    app = App("loaded")
    seen: dict[str, int] = {"header": 0, "envrcpt": 0}

    if not eom_only:

        @app.on("header")
        def header(event: Any) -> None:
            seen["header"] += 1

        @app.on("envrcpt")
        def envrcpt(event: EnvRcpt) -> None:
            seen["envrcpt"] += 1

    @app.on("eom")
    def stamp(event: EndOfMessage, ctx: Any) -> Accept:
        ctx.add_header("X-Loaded", "yes")
        return Accept()

    app.seen = seen  # type: ignore[attr-defined]
    return app


def spec_of(server: ServerThread) -> str:
    address = server.address
    if isinstance(address, tuple):
        return f"inet:{address[1]}@[{address[0]}]"
    return f"unix:{address}"


@pytest.mark.parametrize("processes", [1, 2])
def test_counts_every_message_and_answer_over_inet(processes: int) -> None:
    app = stamping_app()
    with ServerThread(app, "inet:0@[127.0.0.1]") as server:
        result = run_load(
            LoadOptions(
                spec=spec_of(server),
                connections=4,
                messages=60,
                processes=processes,
                messages_per_connection=7,
            )
        )
    assert result.messages == 60
    assert result.outcomes == {"accept": 60, "addheader": 60}
    assert result.errors == {}
    assert len(result.latencies_ms) == 60
    assert 0 < result.percentile(0.5) <= result.percentile(0.99)
    if processes == 1:  # the app's counters live in this process
        assert app.seen == {"header": 600, "envrcpt": 120}  # type: ignore[attr-defined]


def test_sends_only_what_an_end_of_message_app_asked_for(sock_dir: Path) -> None:
    app = stamping_app(eom_only=True)
    with ServerThread(app, f"unix:{sock_dir / 'milter.sock'}") as server:
        result = run_load(LoadOptions(spec=spec_of(server), connections=3, messages=30))
    assert result.outcomes == {"accept": 30, "addheader": 30}
    assert result.errors == {}


def test_a_refusing_milter_is_reported_by_verdict() -> None:
    app = App("refusing")

    @app.on("envrcpt")
    def refuse(event: EnvRcpt) -> TempFail:
        return TempFail()

    with ServerThread(app, "inet:0@[127.0.0.1]") as server:
        result = run_load(LoadOptions(spec=spec_of(server), connections=2, messages=10))
    assert result.outcomes == {"tempfail": 10}
    assert result.all_tempfailed


def test_bench_exits_1_when_every_message_was_tempfailed(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A milter whose handlers fail answers TempFail: a benchmark of it must not pass."""
    app = App("failing")

    @app.on("envfrom")
    def broken(event: Any) -> None:
        raise RuntimeError("the database is down")

    with ServerThread(app, "inet:0@[127.0.0.1]") as server:
        spec = spec_of(server)
        capsys.readouterr()
        assert main(["bench", "--spec", spec, "--messages", "6", "--connections", "2"]) == 1
    out = capsys.readouterr().out.splitlines()
    # The server logged the handler's failures before the report: start at the report.
    lines = out[[line.startswith("milter    ") for line in out].index(True) :]
    assert lines[3] == "answers   tempfail 6"
    assert lines[5].startswith("generator busy ")
    # (A note that the generator was the limit may come first: six messages are soon sent.)
    notes = [line for line in lines[6:] if line.startswith("note      6 of 6 messages")]
    assert notes
    assert notes[0].startswith("note      6 of 6 messages were tempfailed: a milter whose")


def test_an_answer_no_mta_would_take_is_an_error() -> None:
    """A milter that negotiates, then answers with an unknown reply code ('Z')."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]

        def serve() -> None:
            while True:  # the generator connects again after each error, up to its limit
                try:
                    conn, _ = listener.accept()
                except OSError:  # the test closed the listener
                    return
                with conn:
                    conn.recv(4096)  # the negotiation
                    conn.sendall(struct.pack("!IcIII", 13, b"O", 6, 0, 0))
                    conn.recv(4096)  # CONNECT and its macros
                    conn.sendall(b"\x00\x00\x00\x01Z")
                    conn.recv(4096)  # until the generator closes

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        result = run_load(
            LoadOptions(spec=f"inet:{port}@127.0.0.1", connections=1, messages=1, timeout=5)
        )
        listener.close()
    assert set(result.errors) == {"unexpected reply 'Z'"}
    assert result.messages == 0


def test_a_milter_that_is_not_there_gives_errors_not_a_hang(sock_dir: Path) -> None:
    result = run_load(
        LoadOptions(spec=f"unix:{sock_dir / 'nobody.sock'}", connections=2, messages=5)
    )
    assert result.messages == 0
    assert sum(result.errors.values()) >= 100
    assert set(result.errors) == {"connect: FileNotFoundError"}


def test_bench_command_prints_a_report_and_json(capsys: pytest.CaptureFixture[str]) -> None:
    app = App("cli")

    @app.on("envfrom")
    def refuse(event: Any) -> Reject:
        return Reject()

    configure_logging("text", "WARNING")  # the milter's lines (one per message) to stderr
    with ServerThread(app, "inet:0@[127.0.0.1]") as server:
        spec = spec_of(server)
        capsys.readouterr()  # the server's own log lines
        assert main(["bench", "--spec", spec, "--messages", "8", "--connections", "2"]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert lines[0] == f"milter    {spec}: 2 connections, 1 process(es), 8 messages"
        assert lines[1].startswith("messages  8 in ")
        assert lines[3] == "answers   reject 8"
        assert lines[4] == "errors    none"
        assert main(["bench", "--spec", spec, "--messages", "4", "--json"]) == 0
        summary = json.loads(capsys.readouterr().out)
        assert summary["messages"] == 4
        assert summary["outcomes"] == {"reject": 4}


def test_bench_command_errors_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--spec", "inet:10025@[127.0.0.1]", "--connections", "0"]) == 2
    assert capsys.readouterr().err == (
        "milterapp bench: error: --connections: must be at least 1, not 0\n"
    )
    assert main(["bench", "--spec", "nonsense"]) == 1  # a bad spec, as for every command
    assert "invalid connection spec 'nonsense'" in capsys.readouterr().err
