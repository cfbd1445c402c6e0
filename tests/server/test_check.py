"""The health check: ``milterapp check SPEC`` and :func:`check_milter`, against a live milter,
nothing, and peers that are not milters (tiny socket servers in threads, loopback only)."""

from __future__ import annotations

import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

import pytest

from milterapp import App
from milterapp.cli import main
from milterapp.constants import ActionFlag, ProtocolFlag
from milterapp.errors import ConnectionSpecError, MilterError
from milterapp.events import Negotiate
from milterapp.protocol.codec import decode_command, encode_command, encode_response
from milterapp.protocol.framing import encode_frame
from milterapp.protocol.mta import DEFAULT_OFFER
from milterapp.replies import NegotiationReply
from milterapp.server.check import CheckError, CheckResult, check_milter
from milterapp.server.logsetup import configure_logging
from milterapp.spec import ConnectionSpec
from milterapp.testing.sockets import ServerThread

#: The offer's packet: 4 length bytes, 'O', version, actions, protocol.
OFFER_SIZE = 17
QUIT = b"\x00\x00\x00\x01Q"


@pytest.fixture(autouse=True)
def _quiet_server() -> None:
    # The served App logs each connection to stdout by default: keep stdout to the check's
    # line (conftest resets logging after each test).
    configure_logging("text", "WARNING")


@pytest.fixture
def live_milter() -> Iterator[str]:
    with ServerThread(App("checked"), "inet:0@[127.0.0.1]") as server:
        host, port = server.address
        yield f"inet:{port}@[{host}]"


class Peer:
    """A listener in a thread for one connection: it reads ``wait_for`` bytes, writes
    ``answer`` (nothing if None), then hangs up, or keeps what it reads until the client
    closes. It reads all that comes before closing, so that the client sees an end of file,
    not a reset."""

    def __init__(self, answer: bytes | None, *, wait_for: int = 0, hang_up: bool = False) -> None:
        self.answer = answer
        self.wait_for = wait_for
        self.hang_up = hang_up
        self.received = b""
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.spec = f"inet:{self.listener.getsockname()[1]}@[127.0.0.1]"
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        self.listener.settimeout(10)  # bounds a test that went wrong; never reached otherwise
        connection, _ = self.listener.accept()
        with connection:
            connection.settimeout(10)
            while len(self.received) < self.wait_for:
                self.received += connection.recv(4096)
            if self.answer is not None:
                connection.sendall(self.answer)
            while not self.hang_up and (data := connection.recv(4096)):
                self.received += data

    def __enter__(self) -> Peer:
        self._thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._thread.join(10)
        self.listener.close()


def free_port_spec() -> str:
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]
    return f"inet:{port}@[127.0.0.1]"


def failure(capsys: pytest.CaptureFixture[str]) -> str:
    """The one line on stderr, checked to be the only output."""
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("milterapp: check failed: ")
    return lines[0]


# --- a live milter ----------------------------------------------------------------------------


def test_live_milter_is_one_ok_line_naming_version_and_flags(
    live_milter: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["check", live_milter]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    (line,) = captured.out.splitlines()
    assert line.startswith(f"ok {live_milter} version 6, actions ADDHDRS|CHGBODY|")
    assert ", protocol NOBODY|" in line
    assert line.endswith(" ms")


def test_live_milter_on_a_unix_socket(sock_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = f"unix:{sock_dir}/milter.sock"
    with ServerThread(App("checked"), spec):
        assert main(["check", spec, "--timeout", "2"]) == 0
    assert capsys.readouterr().out.startswith(f"ok {spec} version 6, ")


def test_check_milter_returns_what_the_milter_asked_for(live_milter: str) -> None:
    result = check_milter(live_milter, timeout=5.0)
    assert str(result.spec) == live_milter
    assert result.version == 6
    assert ActionFlag.ADDHDRS in result.actions
    assert ActionFlag.SETSYMLIST not in result.actions  # asked for only with macro lists
    assert ProtocolFlag.NOBODY in result.protocol  # an App without handlers wants no body
    assert 0 < result.round_trip < 5


def test_the_check_offers_what_postfix_offers_then_quits() -> None:
    reply = encode_response(
        NegotiationReply(version=6, actions=ActionFlag.ADDHDRS, protocol=ProtocolFlag.NONE)
    )
    with Peer(reply, wait_for=OFFER_SIZE) as milter:
        result = check_milter(milter.spec)
    offer = decode_command(milter.received[4], milter.received[5:OFFER_SIZE])
    assert isinstance(offer, Negotiate)
    assert offer == DEFAULT_OFFER
    assert offer.version == 6
    assert offer.actions == ActionFlag.ALL
    assert offer.protocol == ProtocolFlag.ALL
    assert milter.received[OFFER_SIZE:] == QUIT
    assert "actions ADDHDRS, protocol none, " in result.status_line()


# --- nothing there ----------------------------------------------------------------------------


def test_a_port_nobody_listens_on_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    spec = free_port_spec()
    assert main(["check", spec]) == 1
    assert failure(capsys) == (
        f"milterapp: check failed: {spec}: connection refused: nothing listens on that port"
    )


def test_a_unix_path_that_does_not_exist(
    sock_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = f"unix:{sock_dir}/missing.sock"
    assert main(["check", spec]) == 1
    assert failure(capsys) == f"milterapp: check failed: {spec}: no such socket"


def test_a_stale_unix_socket_file_is_refused(
    sock_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = sock_dir / "stale.sock"
    with socket.socket(socket.AF_UNIX) as bound:  # bound, never listening: as after a crash
        bound.bind(str(path))
        assert main(["check", f"unix:{path}"]) == 1
    assert "connection refused: nothing listens on that socket file" in failure(capsys)


# --- something that is not a milter -----------------------------------------------------------


@pytest.mark.parametrize(
    ("greeting", "wait_for", "quoted"),
    [
        (b"220 smtp ready\r\n", 0, r"b'220 smtp ready\r\n'"),
        (b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n", 1, "b'HTTP/1.1 400 Bad"),
    ],
    ids=["smtp", "http"],
)
def test_a_server_that_is_not_a_milter(
    greeting: bytes, wait_for: int, quoted: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with Peer(greeting, wait_for=wait_for) as peer:
        assert main(["check", peer.spec]) == 1
    line = failure(capsys)
    assert line.startswith(f"milterapp: check failed: {peer.spec}: not a milter: it answered ")
    assert quoted in line
    assert line.endswith("which is not a milter negotiation reply")


def test_a_milter_with_an_impossible_reply(capsys: pytest.CaptureFixture[str]) -> None:
    version_7 = encode_frame(b"O", struct.pack("!III", 7, 0, 0))
    with Peer(version_7, wait_for=OFFER_SIZE) as peer:
        assert main(["check", peer.spec]) == 1
    assert ": the milter's negotiation reply is invalid: " in failure(capsys)


def test_a_peer_that_hangs_up_without_answering(capsys: pytest.CaptureFixture[str]) -> None:
    # As a milter at its connection limit does, or a proxy with no server behind it.
    with Peer(None, wait_for=OFFER_SIZE, hang_up=True) as peer:
        assert main(["check", peer.spec]) == 1
    assert failure(capsys) == (
        f"milterapp: check failed: {peer.spec}: the peer closed the connection without "
        "answering the negotiation"
    )


# --- a peer that never answers ----------------------------------------------------------------


def test_a_listener_that_never_answers_times_out(capsys: pytest.CaptureFixture[str]) -> None:
    with Peer(None) as silent:
        started = time.monotonic()
        assert main(["check", silent.spec, "--timeout", "0.5"]) == 1
        elapsed = time.monotonic() - started
    assert 0.5 <= elapsed < 5
    assert failure(capsys) == (
        f"milterapp: check failed: {silent.spec}: timed out after 0.5 s waiting for the "
        "negotiation reply"
    )
    assert silent.received == encode_command(DEFAULT_OFFER)  # and no QUIT: it owes a reply


# --- the command line -------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["bogus:1", "inet:10025@[127.0.0.1]:25", "unix:"])
def test_a_bad_spec_is_status_2_and_one_line(spec: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", spec]) == 2
    assert f"check failed: invalid connection spec {spec!r}: " in failure(capsys)


@pytest.mark.parametrize("timeout", ["0", "-1", "soon", "inf", "nan"])
def test_a_bad_timeout_is_status_2_and_one_line(
    timeout: str, capsys: pytest.CaptureFixture[str]
) -> None:
    status: int | str | None
    try:
        status = main(["check", "inet:10025@[127.0.0.1]", "--timeout", timeout])
    except SystemExit as stop:  # argparse's own checks exit; ours return the status
        status = stop.code
    assert status == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("milterapp check: error: --timeout: ")


def test_check_milter_raises_milterapp_errors() -> None:
    with pytest.raises(CheckError, match="connection refused") as refused:
        check_milter(free_port_spec())
    assert isinstance(refused.value, MilterError)
    assert refused.value.problem == "connection refused: nothing listens on that port"
    with pytest.raises(ConnectionSpecError):
        check_milter("bogus:1")
    with pytest.raises(ValueError, match="above 0"):
        check_milter("inet:10025@[127.0.0.1]", timeout=0)


def test_python_m_milterapp_check(live_milter: str) -> None:
    ok = subprocess.run(  # noqa: S603 - our own interpreter and module
        [sys.executable, "-m", "milterapp", "check", live_milter, "--timeout", "5"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (ok.returncode, ok.stderr) == (0, "")
    assert ok.stdout.startswith(f"ok {live_milter} version 6, ")
    assert ok.stdout.count("\n") == 1
    refused = subprocess.run(  # noqa: S603 - our own interpreter and module
        [sys.executable, "-m", "milterapp", "check", free_port_spec()],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (refused.returncode, refused.stdout) == (1, "")
    assert refused.stderr.startswith("milterapp: check failed: ")
    assert refused.stderr.count("\n") == 1  # no traceback


def test_the_ok_line_names_each_flag_and_shows_unnamed_bits_in_hex() -> None:
    spec = ConnectionSpec.parse("unix:/run/mymilter/milter.sock")
    flags = ActionFlag.ADDHDRS | ActionFlag(0x200)  # 0x200: a bit no milter version defines
    result = CheckResult(spec, 6, flags, ProtocolFlag.NONE, round_trip=0.00125)
    assert result.status_line() == (
        "ok unix:/run/mymilter/milter.sock version 6, actions ADDHDRS|0x200, protocol none, 1.2 ms"
    )
