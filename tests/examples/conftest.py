"""Shared fixtures for the example tests: load an example by name, and a private Redis.

``load_example("add_header")`` executes ``examples/add_header.py`` as a fresh module each time
it is called, so every test starts from the example's own module-level state (counters,
constants, a new ``app``), and two calls give two independent copies (two "milter hosts").

``redis_url`` is a ``redis://`` URL to an empty database of a private ``redis-server`` that
runs for the whole session on a free loopback port. Without ``redis-server`` or the ``redis``
Python package the tests that need it skip, with the reason printed; under CI (``CI`` set)
they fail instead, since ``.ci/run`` installs both.
"""

from __future__ import annotations

import importlib.util
import itertools
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
REDIS_SERVER = "/usr/bin/redis-server"
#: Bounded wait for redis-server to answer PING (seconds).
REDIS_START_TIMEOUT = 15.0

_loaded = itertools.count()


def load_example_module(name: str) -> ModuleType:
    """Execute ``examples/<name>.py`` as a new module and return it."""
    path = EXAMPLES / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"example_{name}_{next(_loaded)}", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def load_example() -> Callable[[str], ModuleType]:
    """A function: ``load_example(name)`` returns a freshly executed example module."""
    return load_example_module


def _skip_or_fail(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"the Redis example tests cannot run under CI: {reason}")
    pytest.skip(reason)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _answers_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0) as conn:
            conn.sendall(b"PING\r\n")
            return conn.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def _start_redis(executable: str, directory: Path) -> tuple[subprocess.Popen[bytes], int]:
    """Start redis-server on a free port and wait (bounded) until it answers PING."""
    log = directory / "redis.log"
    for _ in range(3):  # another process may take the free port before redis-server binds it
        port = _free_port()
        command = [
            executable,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(directory),
            "--logfile",
            str(log),
        ]
        process = subprocess.Popen(  # noqa: S603 - a fixed command line, our own arguments
            command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + REDIS_START_TIMEOUT
        while time.monotonic() < deadline and process.poll() is None:
            if _answers_ping(port):
                return process, port
            time.sleep(0.05)  # polling an external process's readiness, with a deadline
        if process.poll() is None:
            process.kill()
        _, stderr = process.communicate()
        if time.monotonic() >= deadline:
            break
    output = log.read_text(errors="replace") if log.exists() else ""
    raise RuntimeError(
        f"redis-server did not answer PING on 127.0.0.1:{port} within {REDIS_START_TIMEOUT} s "
        f"(exit status {process.returncode}); stderr: {stderr.decode(errors='replace')!r}; "
        f"log:\n{output}"
    )


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """A private redis-server for the session (no persistence); yields its port."""
    executable = shutil.which("redis-server") or REDIS_SERVER
    if not Path(executable).exists():
        _skip_or_fail("redis-server is not installed (Debian: apt-get install redis-server)")
    try:
        import redis  # noqa: F401 - only checking that the examples' client is there
    except ImportError:
        _skip_or_fail("the redis Python package is not installed (pip install redis)")
    process, port = _start_redis(executable, tmp_path_factory.mktemp("redis"))
    try:
        yield port
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stderr is not None:
            process.stderr.close()


@pytest.fixture
def redis_url(redis_server: int) -> str:
    """The URL of an emptied database on the private redis-server."""
    import redis

    url = f"redis://127.0.0.1:{redis_server}/0"
    with redis.Redis.from_url(url) as client:
        client.flushdb()
    return url
