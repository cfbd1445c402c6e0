"""An SMTP sink for end-to-end tests: accepts every message and records what it got.

A private Sendmail relays everything here (``SMART_HOST``), so the tests can read back the
envelope and the content it delivered. The sink runs an asyncio server in a background
thread on a free loopback port. It can also receive syslog datagrams on a unix socket
(Sendmail's log, which has no other way out on a machine without syslogd).
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import socket
import threading
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path
from typing import Final

_MAX_LINE: Final = 1024 * 1024


@dataclass(frozen=True)
class Delivery:
    """One SMTP transaction the sink accepted: envelope and the raw message (CRLF)."""

    sender: str
    recipients: tuple[str, ...]
    data: bytes

    def message(self) -> EmailMessage:
        parsed = email.message_from_bytes(self.data, policy=email.policy.default)
        assert isinstance(parsed, EmailMessage)
        return parsed


def _address(argument: str) -> str:
    # "FROM:<a@b> SIZE=10" -> "a@b"
    start, end = argument.find("<"), argument.find(">")
    return argument[start + 1 : end] if 0 <= start < end else argument.split(":", 1)[-1].strip()


class _LogProtocol(asyncio.DatagramProtocol):
    def __init__(self, path: Path) -> None:
        self.path = path

    def datagram_received(self, data: bytes, addr: object) -> None:
        with self.path.open("ab") as log:
            log.write(data.rstrip(b"\0\n") + b"\n")


class SmtpSink:
    """Accept mail on ``127.0.0.1:port`` and keep every transaction in :attr:`deliveries`.

    Args:
        syslog_socket: where to receive syslog datagrams (None: no log socket).
        syslog_file: the file they are appended to.
    """

    def __init__(self, syslog_socket: Path | None = None, syslog_file: Path | None = None) -> None:
        self.port = 0
        self._syslog = (syslog_socket, syslog_file)
        self._deliveries: list[Delivery] = []
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="smtp-sink", daemon=True)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped: asyncio.Event | None = None
        self._error: BaseException | None = None

    @property
    def deliveries(self) -> list[Delivery]:
        with self._lock:
            return list(self._deliveries)

    def start(self) -> None:
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise RuntimeError(f"the SMTP sink did not start: {self._error!r}")

    def stop(self) -> None:
        if self._loop is not None and self._stopped is not None:
            self._loop.call_soon_threadsafe(self._stopped.set)
        if self._thread.is_alive():
            self._thread.join(10)

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # noqa: BLE001 - reported by start()
            self._error = exc
        finally:
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        server = await asyncio.start_server(self._session, "127.0.0.1", 0, limit=_MAX_LINE)
        self.port = server.sockets[0].getsockname()[1]
        transport = None
        sock_path, log_path = self._syslog
        if sock_path is not None and log_path is not None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            sock.bind(str(sock_path))
            sock_path.chmod(0o666)
            transport, _ = await self._loop.create_datagram_endpoint(
                lambda: _LogProtocol(log_path), sock=sock
            )
        self._ready.set()
        try:
            async with server:
                await self._stopped.wait()
        finally:
            if transport is not None:
                transport.close()

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sender, recipients = "", list[str]()

        async def reply(text: str) -> None:
            writer.write(text.encode() + b"\r\n")
            await writer.drain()

        try:
            await reply("220 sink.test.example ESMTP sink")
            while line := await reader.readline():
                command, _, argument = line.decode("latin-1").rstrip("\r\n").partition(" ")
                verb = command.upper()
                if verb == "EHLO":
                    await reply("250-sink.test.example\r\n250-8BITMIME\r\n250 PIPELINING")
                elif verb in ("HELO", "NOOP"):
                    await reply("250 ok")
                elif verb == "RSET":
                    sender, recipients = "", []
                    await reply("250 ok")
                elif verb == "MAIL":
                    sender, recipients = _address(argument), []
                    await reply("250 ok")
                elif verb == "RCPT":
                    recipients.append(_address(argument))
                    await reply("250 ok")
                elif verb == "DATA":
                    await reply("354 go ahead")
                    data = bytearray()
                    while (chunk := await reader.readline()) not in (b".\r\n", b""):
                        data += chunk[1:] if chunk.startswith(b".") else chunk
                    with self._lock:
                        self._deliveries.append(Delivery(sender, tuple(recipients), bytes(data)))
                    sender, recipients = "", []
                    await reply("250 ok: stored")
                elif verb == "QUIT":
                    await reply("221 bye")
                    break
                else:
                    await reply("502 not implemented")
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
