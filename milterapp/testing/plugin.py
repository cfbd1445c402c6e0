"""pytest plugin (registered as ``milterapp`` through the ``pytest11`` entry point).

Fixtures:

``milter_client``
    A factory: ``milter_client(app, mta="postfix", ...)`` returns a
    :class:`~milterapp.testing.client.MilterTestClient` driving ``app`` in memory; every
    client it made is closed after the test (and a handler error it kept is raised then).

``milter_server``
    A factory: ``milter_server(app, spec="inet:0@[127.0.0.1]", **options)`` serves ``app``
    in a background thread (:class:`~milterapp.testing.sockets.ServerThread`) and returns it;
    ``.address`` tells where. Every server is stopped after the test.

``milter_recording``
    A function that replays a recording file against an app and asserts the same answers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from milterapp.app import App
    from milterapp.testing.client import MilterTestClient
    from milterapp.testing.sockets import ServerThread

__all__ = ["milter_client", "milter_recording", "milter_server"]


@pytest.fixture
def milter_client() -> Iterator[Callable[..., MilterTestClient]]:
    """Make in-memory MTA clients for Apps; all are closed after the test."""
    from milterapp.testing.client import MilterTestClient

    clients: list[MilterTestClient] = []

    def make(app: App, **options: Any) -> MilterTestClient:
        client = MilterTestClient(app, **options)
        clients.append(client)
        return client

    yield make
    errors = []
    for client in clients:
        try:
            client.close()
        except Exception as exc:  # noqa: BLE001 - close every client, then report
            errors.append(exc)
    if errors:
        raise errors[0]


@pytest.fixture
def milter_server() -> Iterator[Callable[..., ServerThread]]:
    """Serve Apps in background threads; all are stopped after the test."""
    from milterapp.testing.sockets import ServerThread

    servers: list[ServerThread] = []

    def start(app: App, spec: str = "inet:0@[127.0.0.1]", **options: Any) -> ServerThread:
        server = ServerThread(app, spec, **options)
        server.__enter__()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def milter_recording() -> Callable[[str | Path, App], None]:
    """Replay a recording against an app; fail the test if any answer differs."""

    def check(path: str | Path, app: App) -> None:
        from milterapp.testing.recording.replay import replay_sync

        replay_sync(path, app).assert_same()

    return check
