"""Accepting connections: every connection waiting, at each turn of the loop, on any loop.

The server does not use ``loop.create_server``, for two reasons found under load:

* uvloop (libuv 1.45 and later) accepts one connection per turn of the loop. Postfix opens a
  milter connection for each SMTP session; with a few hundred sessions at once, a busy loop
  turned a few hundred times a second, and hundreds of connections waited in the backlog,
  unseen by the latency of the messages being served.
* Both loops listen again on the socket they are given, with their own backlog of 100: the
  ``backlog`` option had no effect, and neither had a systemd socket's ``Backlog=``.

Here the listening socket is watched with ``add_reader``; each time it is readable, up to
:data:`ACCEPTS_PER_TURN` connections are accepted and handed to the loop with
``connect_accepted_socket``, which asyncio and uvloop both provide.

Each reply must leave at once: Nagle's algorithm would hold a small reply back until the MTA
acknowledges the previous one, which its delayed ACKs make take about 40 ms. uvloop disables
it on every TCP transport, asyncio's loop on sockets whose protocol is ``IPPROTO_TCP`` (ours,
made from ``getaddrinfo`` or inherited from systemd); on any other inet socket the acceptor
disables it, on the accepted socket, rather than asking each transport for its socket (which
cost two system calls and a wrapper object per connection).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
from collections.abc import Callable
from typing import Any, Final

from milterapp.server.loops import loop_name

__all__ = ["ACCEPTS_PER_TURN", "RETRY_DELAY", "Acceptor"]

#: Connections accepted each time the socket is readable: enough for any burst, few enough
#: that the connections already served are not kept waiting (the rest wait for the next turn).
ACCEPTS_PER_TURN: Final = 64
#: Seconds before accepting again after accept() failed, for instance when the process ran
#: out of file descriptors (the connections wait in the backlog meanwhile), as asyncio's own
#: servers do for that case.
RETRY_DELAY: Final = 1.0


def _sets_no_delay(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> bool:
    """Whether ``loop``'s transports disable Nagle's algorithm on what ``sock`` accepts."""
    return loop_name(loop) == "uvloop" or sock.proto == socket.IPPROTO_TCP


class Acceptor:
    """Accepts connections on ``sock`` (already listening) for ``protocol_factory``."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        protocol_factory: Callable[[], asyncio.BaseProtocol],
        log: Any,
    ) -> None:
        self._loop = loop
        self._sock = sock
        self._factory = protocol_factory
        self._log = log
        self._no_delay = sock.family in (socket.AF_INET, socket.AF_INET6) and not _sets_no_delay(
            loop, sock
        )
        self._reading = False
        self._retry: asyncio.TimerHandle | None = None
        # Connections handed to the loop whose protocol is not connected yet.
        self._setting_up: set[asyncio.Task[Any]] = set()

    @property
    def accepting(self) -> bool:
        """Whether connections are being accepted (False while paused and once closed)."""
        return self._reading

    def start(self) -> None:
        """Accept from now on."""
        self._retry = None
        if not self._reading:
            self._sock.setblocking(False)
            self._loop.add_reader(self._sock.fileno(), self._accept_waiting)
            self._reading = True

    async def close(self) -> None:
        """Stop accepting; return once the connections already accepted are set up."""
        self._pause()
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        if self._setting_up:
            await asyncio.wait(set(self._setting_up))

    def _pause(self) -> None:
        if self._reading:
            self._loop.remove_reader(self._sock.fileno())
            self._reading = False

    def _accept_waiting(self) -> None:
        for _ in range(ACCEPTS_PER_TURN):
            try:
                conn, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return  # none left
            except ConnectionAbortedError:
                continue  # the peer gave up while waiting: the next one
            except OSError as exc:
                self._failed(exc)
                return
            # (Both loops make the socket non-blocking themselves.)
            if self._no_delay:
                with contextlib.suppress(OSError):  # reset already: the transport finds out
                    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            task = self._loop.create_task(self._loop.connect_accepted_socket(self._factory, conn))
            self._setting_up.add(task)
            task.add_done_callback(self._set_up)

    def _failed(self, exc: OSError) -> None:
        # Out of descriptors or memory, most often; whatever it is, the socket stays readable,
        # so accepting pauses rather than failing again at every turn of the loop. The
        # connections wait in the backlog meanwhile.
        self._log.error(
            "accept_failed",
            error=str(exc),
            errno=errno.errorcode.get(exc.errno or 0),
            retry_in=RETRY_DELAY,
        )
        self._pause()
        self._retry = self._loop.call_later(RETRY_DELAY, self.start)

    def _set_up(self, task: asyncio.Task[Any]) -> None:
        self._setting_up.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            # The transport could not be made (the peer reset it already, say): that one
            # connection is gone; the loop closed its socket.
            self._log.warning("connection_setup_failed", error=repr(exc))
