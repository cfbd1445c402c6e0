"""What the Postfix and Sendmail end-to-end tests share: ports, sample mail, polling."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

SENDER = "sender@test.example"


def free_port() -> int:
    """A loopback port that is free now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def message(subject: str, body: str = "Hello.\r\n", **headers: str) -> bytes:
    """A small message from SENDER; keyword headers use ``_`` for ``-``."""
    head = "".join(f"{name.replace('_', '-')}: {value}\r\n" for name, value in headers.items())
    return f"From: {SENDER}\r\nSubject: {subject}\r\n{head}\r\n{body}".encode()


def poll(
    read: Callable[[], list[T]], count: int, timeout: float, what: str, log: Callable[[], str]
) -> list[T]:
    """Call ``read`` until it returns ``count`` items; fail with the MTA's log after ``timeout``.

    Delivery happens in the MTA's own processes: polling its results is the only way to
    observe it; the interval is short and the wait bounded.
    """
    deadline = time.monotonic() + timeout
    while True:
        items = read()
        if len(items) >= count:
            return items
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}\n--- MTA log ---\n{log()}")
        time.sleep(0.05)
