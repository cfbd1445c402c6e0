"""Listening sockets of the server: every spec form, unix socket options and their errors,
inet errors, pre-opened sockets and systemd socket activation; all over real sockets."""

from __future__ import annotations

import grp
import json
import os
import socket
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import structlog
import structlog.testing
from pydantic import ValidationError

from milterapp.errors import ServerError, ServerErrorKind
from milterapp.events import ConnectionOpened
from milterapp.replies import AddHeader, Continue
from milterapp.server import MilterServer, ServerOptions
from milterapp.server.listener import listen
from tests.server.support import (
    LOOPBACK,
    assert_serves,
    run,
    running_server,
    stamping_app,
)


def ipv6_loopback_available() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


# --- spec forms ------------------------------------------------------------------------


def test_listen_inet_address_literal_serves() -> None:
    async def main() -> None:
        async with running_server(stamping_app(), "inet:0@[127.0.0.1]") as server:
            host, port = server.address
            assert host == "127.0.0.1"
            assert port > 0
            await assert_serves(server)

    run(main())


def test_listen_inet_host_name_serves() -> None:
    async def main() -> None:
        async with running_server(stamping_app(), "inet:0@localhost") as server:
            assert server.address[0] == "127.0.0.1"
            await assert_serves(server)

    run(main())


def test_listen_inet6_loopback_serves() -> None:
    if not ipv6_loopback_available():
        pytest.skip("IPv6 loopback (::1) is not available on this machine")

    async def main() -> None:
        async with running_server(stamping_app(), "inet6:0@[::1]") as server:
            assert server.address[0] == "::1"
            await assert_serves(server)

    run(main())


@pytest.mark.parametrize("scheme", ["unix", "local"])
def test_listen_unix_socket_serves(scheme: str, sock_dir: Path) -> None:
    path = str(sock_dir / "milter.sock")
    app = stamping_app()
    peers: list[str] = []

    @app.on("open")
    def opened(event: ConnectionOpened) -> None:
        peers.append(event.peer)

    async def main() -> None:
        async with running_server(app, f"{scheme}:{path}") as server:
            assert server.address == path
            assert stat.S_ISSOCK(os.lstat(path).st_mode)
            await assert_serves(server)

    run(main())
    assert not os.path.lexists(path)
    assert peers == [path]  # a unix peer is named by the socket path


def test_listen_unix_path_of_107_bytes_serves(sock_dir: Path) -> None:
    path = str(sock_dir / "s")
    path += "x" * (107 - len(path))
    assert len(os.fsencode(path)) == 107

    async def main() -> None:
        async with running_server(stamping_app(), f"unix:{path}") as server:
            await assert_serves(server)

    run(main())


# --- unix socket options -----------------------------------------------------------------


def test_unix_socket_default_mode_is_0660(sock_dir: Path) -> None:
    path = str(sock_dir / "milter.sock")

    async def main() -> None:
        async with running_server(stamping_app(), f"unix:{path}"):
            assert os.stat(path).st_mode & 0o777 == 0o660

    run(main())


def test_unix_socket_mode_option_is_honoured(sock_dir: Path) -> None:
    path = str(sock_dir / "milter.sock")

    async def main() -> None:
        async with running_server(stamping_app(), f"unix:{path}", unix_socket_mode=0o600) as server:
            assert os.stat(path).st_mode & 0o777 == 0o600
            await assert_serves(server)

    run(main())


@pytest.mark.parametrize(("mode", "warned"), [(0o660, False), (0o666, True), (0o664, True)])
def test_a_unix_socket_open_to_others_is_served_with_a_warning(
    mode: int, warned: bool, sock_dir: Path
) -> None:
    path = str(sock_dir / "milter.sock")

    async def main() -> None:
        async with running_server(stamping_app(), f"unix:{path}", unix_socket_mode=mode) as server:
            assert os.stat(path).st_mode & 0o777 == mode
            await assert_serves(server)

    with structlog.testing.capture_logs() as logs:
        run(main())
    warnings = [entry for entry in logs if entry["event"] == "unix_socket_open_to_others"]
    assert [(entry["log_level"], entry["mode"]) for entry in warnings] == (
        [("warning", f"{mode:03o}")] if warned else []
    )


@pytest.mark.parametrize("by", ["name", "gid"])
def test_unix_socket_group_of_own_group(by: str, sock_dir: Path) -> None:
    path = str(sock_dir / "milter.sock")
    gid = os.getgid()
    group: str | int = grp.getgrgid(gid).gr_name if by == "name" else gid

    async def main() -> None:
        async with running_server(
            stamping_app(), f"unix:{path}", unix_socket_group=group
        ) as server:
            assert os.stat(path).st_gid == gid
            await assert_serves(server)

    run(main())


def test_unix_socket_group_other_group_is_applied(sock_dir: Path) -> None:
    others = [group for group in grp.getgrall() if group.gr_gid != os.getgid()]
    if os.geteuid() != 0 or not others:
        pytest.skip("changing a socket to another group needs root and a second group")
    other = others[0]
    path = str(sock_dir / "milter.sock")

    async def main() -> None:
        async with running_server(stamping_app(), f"unix:{path}", unix_socket_group=other.gr_name):
            info = os.stat(path)
            assert info.st_gid == other.gr_gid
            assert info.st_mode & 0o777 == 0o660

    run(main())


def test_unix_socket_unknown_group_is_refused(sock_dir: Path) -> None:
    path = str(sock_dir / "milter.sock")
    server = MilterServer(
        stamping_app(), spec=f"unix:{path}", unix_socket_group="no-such-group-milterapp"
    )
    with pytest.raises(ServerError) as caught:
        run(server.start())
    assert caught.value.kind is ServerErrorKind.UNIX_SOCKET
    assert "no-such-group-milterapp" in str(caught.value)
    assert not os.path.lexists(path)


def test_unix_socket_removed_on_close_by_default(sock_dir: Path) -> None:
    path = str(sock_dir / "milter.sock")

    async def main() -> None:
        async with running_server(stamping_app(), f"unix:{path}"):
            assert stat.S_ISSOCK(os.lstat(path).st_mode)

    run(main())
    assert not os.path.lexists(path)


def test_unix_socket_kept_on_close_when_asked(sock_dir: Path) -> None:
    path = str(sock_dir / "milter.sock")

    async def main() -> None:
        async with running_server(
            stamping_app(), f"unix:{path}", remove_unix_socket_on_close=False
        ):
            pass
        assert stat.S_ISSOCK(os.lstat(path).st_mode)

    run(main())


def test_unix_socket_replaced_after_start_is_not_removed_on_close(sock_dir: Path) -> None:
    path = sock_dir / "milter.sock"

    async def main() -> None:
        async with running_server(stamping_app(), f"unix:{path}"):
            path.unlink()
            path.write_text("someone else's file")
        assert path.read_text() == "someone else's file"

    run(main())


def make_stale_socket(path: Path) -> None:
    """Leave a socket file nobody listens on, as a crashed milter does."""
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()
    assert stat.S_ISSOCK(os.lstat(path).st_mode)


def test_unix_socket_stale_file_is_removed_on_start(sock_dir: Path) -> None:
    path = sock_dir / "milter.sock"
    make_stale_socket(path)
    os.chmod(path, 0o604)  # to tell it from ours (inode numbers may be reused)

    async def main() -> None:
        async with running_server(stamping_app(), f"unix:{path}") as server:
            assert os.lstat(path).st_mode & 0o777 == 0o660
            await assert_serves(server)

    run(main())


def test_unix_socket_stale_file_kept_without_remove_on_create(sock_dir: Path) -> None:
    path = sock_dir / "milter.sock"
    make_stale_socket(path)
    os.chmod(path, 0o604)
    server = MilterServer(stamping_app(), spec=f"unix:{path}", remove_unix_socket_on_create=False)
    with pytest.raises(ServerError) as caught:
        run(server.start())
    assert caught.value.kind is ServerErrorKind.UNIX_SOCKET
    assert "already exists" in str(caught.value)
    assert os.lstat(path).st_mode & 0o777 == 0o604  # the stale file, untouched


@pytest.mark.parametrize("remove_on_create", [True, False])
def test_unix_socket_regular_file_is_never_removed(remove_on_create: bool, sock_dir: Path) -> None:
    path = sock_dir / "milter.sock"
    path.write_text("precious data\n")
    server = MilterServer(
        stamping_app(), spec=f"unix:{path}", remove_unix_socket_on_create=remove_on_create
    )
    with pytest.raises(ServerError) as caught:
        run(server.start())
    assert caught.value.kind is ServerErrorKind.UNIX_SOCKET
    assert str(path) in str(caught.value)
    assert path.read_text() == "precious data\n"


def test_unix_socket_symlink_is_not_followed(sock_dir: Path) -> None:
    target = sock_dir / "target.txt"
    target.write_text("precious data\n")
    path = sock_dir / "milter.sock"
    path.symlink_to(target)
    server = MilterServer(stamping_app(), spec=f"unix:{path}")
    with pytest.raises(ServerError) as caught:
        run(server.start())
    assert caught.value.kind is ServerErrorKind.UNIX_SOCKET
    assert "not a socket" in str(caught.value)
    assert path.is_symlink()
    assert target.read_text() == "precious data\n"


def test_unix_socket_symlink_to_stale_socket_is_not_removed(sock_dir: Path) -> None:
    stale = sock_dir / "stale.sock"
    make_stale_socket(stale)
    path = sock_dir / "milter.sock"
    path.symlink_to(stale)
    server = MilterServer(stamping_app(), spec=f"unix:{path}")
    with pytest.raises(ServerError) as caught:
        run(server.start())
    assert caught.value.kind is ServerErrorKind.UNIX_SOCKET
    assert path.is_symlink()
    assert stat.S_ISSOCK(os.lstat(stale).st_mode)


def test_unix_socket_live_socket_is_never_removed(sock_dir: Path) -> None:
    path = sock_dir / "milter.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as live:
        live.bind(str(path))
        live.listen()
        inode = os.lstat(path).st_ino
        server = MilterServer(stamping_app(), spec=f"unix:{path}")
        with pytest.raises(ServerError) as caught:
            run(server.start())
        assert caught.value.kind is ServerErrorKind.UNIX_SOCKET
        assert "another process is listening" in str(caught.value)
        assert os.lstat(path).st_ino == inode
        # The other process still gets its connections.
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.connect(str(path))


def test_unix_socket_path_too_long_is_refused(sock_dir: Path) -> None:
    path = str(sock_dir / ("x" * 120))
    server = MilterServer(stamping_app(), spec=f"unix:{path}")
    with pytest.raises(ServerError) as caught:
        run(server.start())
    assert caught.value.kind is ServerErrorKind.UNIX_SOCKET
    assert "the limit is 107" in str(caught.value)
    assert not os.path.lexists(path)


def test_unix_socket_missing_directory_is_refused(sock_dir: Path) -> None:
    path = sock_dir / "missing" / "milter.sock"
    server = MilterServer(stamping_app(), spec=f"unix:{path}")
    with pytest.raises(ServerError) as caught:
        run(server.start())
    assert caught.value.kind is ServerErrorKind.UNIX_SOCKET
    assert "does not exist" in str(caught.value)


def test_unix_socket_failed_start_leaves_app_startable(sock_dir: Path) -> None:
    app = stamping_app()
    server = MilterServer(app, spec=f"unix:{sock_dir / 'missing' / 'milter.sock'}")
    with pytest.raises(ServerError):
        run(server.start())

    async def main() -> None:
        async with running_server(app, f"unix:{sock_dir / 'milter.sock'}") as second:
            await assert_serves(second)

    run(main())


# --- inet errors -------------------------------------------------------------------------


def test_inet_address_in_use_is_an_io_error() -> None:
    app = stamping_app()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        server = MilterServer(app, spec=f"inet:{port}@[127.0.0.1]")
        with pytest.raises(ServerError) as caught:
            run(server.start())
    assert caught.value.kind is ServerErrorKind.IO
    assert "already in use" in str(caught.value)
    assert str(port) in str(caught.value)

    async def main() -> None:  # the failed start left nothing behind
        async with running_server(app) as second:
            await assert_serves(second)

    run(main())


def test_inet_same_app_started_twice_is_a_running_error() -> None:
    app = stamping_app()

    async def main() -> None:
        async with running_server(app) as server:
            with pytest.raises(ServerError) as caught:
                await MilterServer(app, spec=LOOPBACK).start()
            assert caught.value.kind is ServerErrorKind.RUNNING
            assert "already serving" in str(caught.value)
            await assert_serves(server)  # the running server is not disturbed

    run(main())


def test_inet_app_can_serve_again_after_close() -> None:
    app = stamping_app()

    async def main() -> None:
        async with running_server(app) as first:
            await assert_serves(first)
        async with running_server(app) as second:
            await assert_serves(second)

    run(main())


# --- backlog and pre-opened sockets --------------------------------------------------------


def test_backlog_zero_is_a_validation_error() -> None:
    with pytest.raises(ValidationError, match="backlog"):
        ServerOptions(backlog=0)
    with pytest.raises(ValidationError, match="backlog"):
        MilterServer(stamping_app(), spec=LOOPBACK, backlog=0)


def _accept_queue(sock: socket.socket) -> int:
    """Connections the kernel completed that ``sock`` has not accepted (Linux)."""
    local = "{:08X}:{:04X}".format(
        int.from_bytes(socket.inet_aton("127.0.0.1"), "little"), sock.getsockname()[1]
    )
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == local and fields[3] == "0A":  # LISTEN
            return int(fields[4].split(":")[1], 16)  # rx_queue of a listener: its accept queue
    raise AssertionError(f"listener {local} not in /proc/net/tcp")


def test_backlog_default_holds_a_burst_of_connections() -> None:
    # Postfix's smtpd processes connect at once when mail arrives in a burst. Past a full
    # backlog the kernel drops handshakes and each of those waits a second or more; with the
    # old default of 128 the 129th connection here waited out its timeout.
    assert ServerOptions().backlog == socket.SOMAXCONN
    burst = min(300, int(Path("/proc/sys/net/core/somaxconn").read_text()))
    listener = listen(ServerOptions(spec=LOOPBACK))
    clients: list[socket.socket] = []
    try:
        port = listener.sock.getsockname()[1]
        for _ in range(burst):  # nothing accepts them: they all wait in the backlog
            clients.append(socket.create_connection(("127.0.0.1", port), timeout=0.5))
        assert _accept_queue(listener.sock) == burst
    finally:
        for client in clients:
            client.close()
        listener.close()


def test_running_server_keeps_its_backlog() -> None:
    # The event loop listens again on the socket it serves (asyncio's and uvloop's default
    # backlog is 100): the server must pass its own.
    burst = min(300, int(Path("/proc/sys/net/core/somaxconn").read_text()))

    async def main() -> None:
        async with running_server(stamping_app()) as server:
            assert server.listener is not None
            port = server.listener.sock.getsockname()[1]
            clients: list[socket.socket] = []
            try:
                # Connected without awaiting: the loop does not run, so nothing is accepted.
                for _ in range(burst):
                    clients.append(socket.create_connection(("127.0.0.1", port), timeout=0.5))
                assert _accept_queue(server.listener.sock) == burst
            finally:
                for client in clients:
                    client.close()

    run(main())


def test_backlog_one_serves() -> None:
    async def main() -> None:
        async with running_server(stamping_app(), backlog=1) as server:
            assert server.listener is not None
            sock = server.listener.sock
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
            await assert_serves(server)

    run(main())


def test_listen_socket_preopened_serves() -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        bound = sock.getsockname()

        async def main() -> None:
            # The spec would fail (missing directory): the given socket is used instead.
            async with running_server(
                stamping_app(), "unix:/nonexistent-milterapp/x.sock", listen_socket=sock
            ) as server:
                assert server.address == bound
                await assert_serves(server)

        run(main())
        assert sock.fileno() == -1  # the server owns it once adopted, and closed it
    finally:
        sock.close()


@pytest.mark.parametrize("kind", ["bound", "datagram"])
def test_listen_socket_not_listening_is_refused(kind: str) -> None:
    family_type = socket.SOCK_STREAM if kind == "bound" else socket.SOCK_DGRAM
    app = stamping_app()
    with socket.socket(socket.AF_INET, family_type) as sock:
        sock.bind(("127.0.0.1", 0))
        server = MilterServer(app, listen_socket=sock)
        with pytest.raises(ServerError) as caught:
            run(server.start())
        assert caught.value.kind is ServerErrorKind.IO
        assert "listening" in str(caught.value)
    assert not app.serving.running  # not left "running"


# --- systemd socket activation (in a child process: it takes fd 3 and the environment) ---

ACTIVATION_SCRIPT = textwrap.dedent(
    """
    import asyncio, json, os, socket, sys

    from milterapp.app import App
    from milterapp.events import Connect, EndOfMessage, EnvFrom, EnvRcpt, Helo
    from milterapp.server import MilterServer
    from milterapp.testing import MtaClient

    mode, spec = sys.argv[1], sys.argv[2]
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    passed_port = listener.getsockname()[1]
    fd = listener.detach()
    if fd != 3:
        os.dup2(fd, 3)
        os.close(fd)
    os.environ["LISTEN_FDS"] = "1"
    os.environ["LISTEN_PID"] = str(os.getpid() if mode == "own" else os.getppid())

    app = App("activated")

    @app.on("eom")
    def stamp(event, ctx):
        ctx.add_header("X-Activated", "yes")

    async def main():
        server = MilterServer(app, spec=spec, socket_activation=True)
        await server.start()
        try:
            port = server.address[1]
            client = await MtaClient.connect(("127.0.0.1", port), timeout=5)
            async with client:
                await client.negotiate()
                for event in (
                    Connect(hostname="localhost", family="U"),
                    Helo(name="client.example"),
                    EnvFrom(address="a@example.org"),
                    EnvRcpt(address="b@example.org"),
                ):
                    await client.send(event)  # no reply: nothing handles them
                answer = await client.send(EndOfMessage())
        finally:
            app.shutdown()
            await server.wait_stopped()
            await server.close()
        return {
            "passed_port": passed_port,
            "bound_port": port,
            "modifications": [repr(m) for m in answer.modifications],
            "verdict": repr(answer.verdict),
            "env_left": sorted(k for k in ("LISTEN_FDS", "LISTEN_PID") if k in os.environ),
        }

    print("RESULT " + json.dumps(asyncio.run(main())))
    """
)


def run_activation(mode: str, spec: str) -> dict[str, object]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LISTEN_")}
    result = subprocess.run(  # noqa: S603 - our own fixed command line
        [sys.executable, "-c", ACTIVATION_SCRIPT, mode, spec],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert len(lines) == 1, result.stdout
    data: dict[str, object] = json.loads(lines[0].removeprefix("RESULT "))
    return data


def test_socket_activation_uses_the_passed_socket() -> None:
    # The spec would fail (missing directory): only the socket on fd 3 can serve.
    result = run_activation("own", "unix:/nonexistent-milterapp/x.sock")
    assert result["bound_port"] == result["passed_port"]
    assert result["modifications"] == [repr(AddHeader(name="X-Activated", value="yes"))]
    assert result["verdict"] == repr(Continue())
    assert result["env_left"] == []  # unset, so that children do not take the socket


def test_socket_activation_for_another_pid_is_ignored() -> None:
    result = run_activation("other", LOOPBACK)
    assert result["bound_port"] != result["passed_port"]  # the spec was used
    assert result["verdict"] == repr(Continue())
    assert result["env_left"] == ["LISTEN_FDS", "LISTEN_PID"]  # not ours: left alone
