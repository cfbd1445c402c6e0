"""Telling systemd how the service is doing (``Type=notify``), without libsystemd.

The protocol is sd_notify(3)'s: systemd names a unix datagram socket in ``$NOTIFY_SOCKET`` (a
path, or an abstract socket when it starts with ``@``), and each message is one datagram of
``KEY=VALUE`` lines. :class:`Notifier` sends ``READY=1``, ``RELOADING=1``, ``STOPPING=1``,
``STATUS=`` and ``WATCHDOG=1``. Without ``$NOTIFY_SOCKET`` every call returns at once. A
failure to send is logged once as ``notify_failed`` and never raised: the milter serves mail
whether systemd hears of it or not.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping
from typing import Any, Final

import structlog

__all__ = ["Notifier"]

#: How long one send may block the event loop when systemd does not read its socket.
_SEND_TIMEOUT: Final = 1.0


class Notifier:
    """Sends sd_notify messages to ``address``; with no address, does nothing.

    Args:
        address: ``$NOTIFY_SOCKET``: a path, or ``@name`` for an abstract socket.
        watchdog_interval: seconds between ``WATCHDOG=1`` pings, or None for no watchdog.
    """

    def __init__(self, address: str | None = None, watchdog_interval: float | None = None) -> None:
        self.address = address
        self.watchdog_interval = watchdog_interval if address else None
        self._sock: socket.socket | None = None
        self._failed = False
        self._log: Any = structlog.get_logger("milterapp")

    def __repr__(self) -> str:
        return f"<Notifier {self.address!r} watchdog={self.watchdog_interval}>"

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        """The notifier systemd asks for: ``$NOTIFY_SOCKET``, and ``$WATCHDOG_USEC`` (half of
        it between pings) if ``$WATCHDOG_PID`` is unset or this process."""
        env = os.environ if environ is None else environ
        interval = None
        usec, pid = env.get("WATCHDOG_USEC", ""), env.get("WATCHDOG_PID", "")
        if usec.isdigit() and int(usec) > 0 and pid in ("", str(os.getpid())):
            interval = int(usec) / 2_000_000  # sd_watchdog_enabled(3): ping at half the limit
        return cls(env.get("NOTIFY_SOCKET") or None, interval)

    @property
    def enabled(self) -> bool:
        """Whether messages go anywhere."""
        return self.address is not None

    def ready(self, status: str | None = None, *, main_pid: int | None = None) -> None:
        """``READY=1``: the service accepts connections (again, after a reload)."""
        lines = ["READY=1"]
        if main_pid is not None:
            lines.append(f"MAINPID={main_pid}")
        if status is not None:
            lines.append(f"STATUS={status}")
        self.send(*lines)

    def reloading(self) -> None:
        """``RELOADING=1``, stamped as ``Type=notify-reload`` requires; ``READY=1`` follows."""
        now = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send("RELOADING=1", f"MONOTONIC_USEC={now}", "STATUS=reloading")

    def stopping(self) -> None:
        """``STOPPING=1``: the service drains and will exit."""
        self.send("STOPPING=1", "STATUS=stopping")

    def watchdog(self) -> None:
        """``WATCHDOG=1``: still alive."""
        self.send("WATCHDOG=1")

    def send(self, *lines: str) -> None:
        """Send one message of ``lines``; log the first failure, never raise."""
        if self.address is None:
            return
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._sock.settimeout(_SEND_TIMEOUT)
            self._sock.sendto("\n".join(lines).encode(), _socket_address(self.address))
        except (OSError, ValueError) as exc:
            if not self._failed:  # once: a missing socket would fail every watchdog ping
                self._failed = True
                self._log.warning("notify_failed", socket=self.address, error=repr(exc))

    def close(self) -> None:
        """Close the socket, if one was opened; a later send opens another."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _socket_address(address: str) -> str | bytes:
    if address.startswith("@"):
        return b"\0" + address[1:].encode()  # Linux's abstract namespace
    if address.startswith("/"):
        return address
    raise ValueError(f"unsupported NOTIFY_SOCKET {address!r} (a path or @name)")
