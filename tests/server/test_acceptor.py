"""Accepting connections (milterapp.server.acceptor): every waiting connection at each turn, on both
loops; the backlog the server was given; out of file descriptors, a pause and no crash."""

from __future__ import annotations

import asyncio
import os
import resource
import socket
from collections.abc import Iterator

import pytest
import structlog.testing

from milterapp.server import MilterServer, acceptor
from tests.server.support import (
    LOOPBACK,
    LOOPS,
    assert_serves,
    run,
    running_server,
    stamping_app,
    until,
)


@pytest.fixture
def clients() -> Iterator[list[socket.socket]]:
    opened: list[socket.socket] = []
    yield opened
    for client in opened:
        client.close()


@pytest.mark.parametrize("loop", LOOPS)
def test_every_waiting_connection_is_accepted_within_a_few_turns(
    loop: str, clients: list[socket.socket]
) -> None:
    # Postfix opens a connection per SMTP session. uvloop's own server accepted one
    # connection per turn of the loop, so that a burst waited in the backlog for as many turns.
    burst = 150

    async def main() -> None:
        async with running_server(stamping_app()) as server:
            port = server.address[1]
            # Connected without awaiting: the loop does not turn, so they wait in the backlog.
            for _ in range(burst):
                clients.append(socket.create_connection(("127.0.0.1", port), timeout=1))
            for _ in range(12):  # 3 turns of accepting, the rest to connect the protocols
                await asyncio.sleep(0)
            assert len(server._connections) == burst

    run(main(), loop=loop)


def _lowest_free_fd() -> int:
    fd = os.dup(0)
    os.close(fd)
    return fd


def test_out_of_file_descriptors_pauses_accepting_then_serves(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(acceptor, "RETRY_DELAY", 0.01)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)

    async def main() -> None:
        async with running_server(stamping_app()) as server:
            port = server.address[1]
            waiting = socket.socket()  # its own descriptor first: connecting needs none
            try:
                with structlog.testing.capture_logs() as logs:
                    resource.setrlimit(resource.RLIMIT_NOFILE, (_lowest_free_fd(), hard))
                    try:
                        waiting.connect(("127.0.0.1", port))  # accept() now fails: EMFILE
                        await until(lambda: any(e["event"] == "accept_failed" for e in logs))
                    finally:
                        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
                failed = next(e for e in logs if e["event"] == "accept_failed")
                assert failed["errno"] == "EMFILE"
                assert failed["retry_in"] == 0.01
                # After the pause the waiting connection is accepted, and the server serves.
                await until(lambda: len(server._connections) == 1)
                await assert_serves(server)
            finally:
                waiting.close()

    run(main())


def test_server_closes_its_socket_once_it_stops_accepting() -> None:
    async def main() -> None:
        server = MilterServer(stamping_app(), spec=LOOPBACK)
        await server.start()
        assert server.listener is not None
        sock = server.listener.sock
        assert server._acceptor is not None
        assert server._acceptor.accepting
        server.app.shutdown()
        await server.wait_stopped()
        await server.close()
        assert not server._acceptor.accepting
        assert sock.fileno() == -1  # refused from now on, not left waiting in the backlog

    run(main())
