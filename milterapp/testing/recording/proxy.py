"""Record a milter conversation: a proxy between an MTA and a running milter.

:func:`record` relays every byte unchanged and writes each packet, both directions, to a
recording file (:mod:`milterapp.testing.recording`); :func:`replay
<milterapp.testing.recording.replay.replay>` turns it into a regression test.
"""

from __future__ import annotations

import asyncio
import itertools
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import structlog

from milterapp.chain.link import open_stream
from milterapp.errors import RemoteProtocolError
from milterapp.protocol.framing import FrameDecoder
from milterapp.server import listener as listening
from milterapp.server.options import ServerOptions
from milterapp.spec import ConnectionSpec
from milterapp.testing.pipe import READ_SIZE
from milterapp.testing.recording.file import MAX_PACKET, Direction, RecordingWriter

__all__ = ["record", "record_sync"]

_CONNECT_TIMEOUT: Final = 30.0  # Postfix's milter_connect_timeout
_CLOSE_TIMEOUT: Final = 5.0
_LOG: Final = structlog.get_logger("milterapp")


class _Connection:
    """One proxied connection's recording state."""

    def __init__(self, conn: int, out: RecordingWriter) -> None:
        self.conn = conn
        self.out = out
        self.start = asyncio.get_running_loop().time()
        self.error: str | None = None
        self.log: Any = _LOG.bind(conn=conn)

    def elapsed(self) -> float:
        return round(asyncio.get_running_loop().time() - self.start, 3)

    def mark_open(self) -> None:
        self.out.marker(self.conn, "open")

    def mark_closed(self) -> None:
        self.out.marker(self.conn, "close", self.elapsed(), self.error)

    def take(self, direction: Direction, frames: FrameDecoder, data: bytes) -> None:
        """Write the packets ``data`` completes; on a framing error, stop recording."""
        frames.feed(data)
        try:
            while (frame := frames.next_frame()) is not None:
                command, payload = frame
                self.out.packet(self.conn, direction, self.elapsed(), command, payload)
        except RemoteProtocolError as exc:
            self.fail(direction, str(exc))

    def fail(self, direction: Direction, why: str) -> None:
        self.error = f"{direction} stream: {why}; relayed but not recorded from there on"
        self.log.warning("recording_stopped", direction=direction, error=why)


async def _open_connection(
    spec: ConnectionSpec,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    async with asyncio.timeout(_CONNECT_TIMEOUT):
        return await open_stream(spec, limit=READ_SIZE)


async def _close(writer: asyncio.StreamWriter) -> None:
    """Close after what was written is sent; abort if the peer does not take it in time."""
    writer.close()
    try:
        async with asyncio.timeout(_CLOSE_TIMEOUT):
            await writer.wait_closed()
    except TimeoutError:
        writer.transport.abort()
    except OSError:
        pass  # the peer reset the connection: closed all the same


class _Recorder:
    """The proxy: relays each MTA connection to the milter and records its packets."""

    def __init__(self, upstream: ConnectionSpec, out: RecordingWriter) -> None:
        self.upstream = upstream
        self.out = out
        self._ids = itertools.count(1)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closing = False

    async def serve(
        self, mta_reader: asyncio.StreamReader, mta_writer: asyncio.StreamWriter
    ) -> None:
        if self._closing:  # accepted just before the listener closed
            mta_writer.transport.abort()
            return
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        conn = _Connection(next(self._ids), self.out)
        conn.mark_open()
        try:
            await self._relay(conn, mta_reader, mta_writer)
        except asyncio.CancelledError:
            # The recorder stops: a normal end here (asyncio reports a cancelled
            # start_server callback task as an error).
            pass
        finally:
            await _close(mta_writer)
            conn.mark_closed()
            self._tasks.discard(task)

    async def _relay(
        self, conn: _Connection, mta_reader: asyncio.StreamReader, mta_writer: asyncio.StreamWriter
    ) -> None:
        try:
            milter_reader, milter_writer = await _open_connection(self.upstream)
        except OSError as exc:
            conn.error = f"cannot connect to the milter at {self.upstream}: {exc!r}"
            conn.log.warning("upstream_unreachable", upstream=str(self.upstream), error=repr(exc))
            return
        pumps = [
            asyncio.create_task(_pump(conn, "mta", mta_reader, milter_writer)),
            asyncio.create_task(_pump(conn, "milter", milter_reader, mta_writer)),
        ]
        try:
            # When either side closes (or fails), the other is closed too.
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pump in pumps:
                pump.cancel()
            milter_writer.close()  # now: a second cancel below must not leave it open
            results = await asyncio.gather(*pumps, return_exceptions=True)
            await _close(milter_writer)
        for result in results:
            if isinstance(result, Exception) and not isinstance(result, OSError):
                conn.log.error("relay_failed", exc_info=result)

    async def close(self) -> None:
        """End every connection (each gets its close marker), then close the file."""
        self._closing = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.out.close()


async def _pump(
    conn: _Connection,
    direction: Direction,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
) -> None:
    """Relay one direction byte for byte, recording the packets on the way."""
    frames = FrameDecoder(MAX_PACKET)
    while data := await reader.read(READ_SIZE):
        if conn.error is None:
            # Recorded before it is relayed: no answer can be read, and recorded, before the
            # packet it answers is in the file.
            conn.take(direction, frames, data)
        writer.write(data)
        await writer.drain()
    if conn.error is None and frames.buffered:
        conn.fail(direction, f"closed in the middle of a packet ({frames.buffered} bytes)")


def _as_spec(spec: str | ConnectionSpec) -> ConnectionSpec:
    return ConnectionSpec.parse(spec) if isinstance(spec, str) else spec


async def record(
    listen: str | ConnectionSpec,
    upstream: str | ConnectionSpec,
    out: str | Path,
    *,
    ready: Callable[[Any], None] | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Relay MTA connections on ``listen`` to the milter at ``upstream``, recording to ``out``.

    Bytes go through unchanged and in order. Each MTA connection gets its own connection to
    the milter; when either side closes, the other is closed. Runs until ``stop`` is set
    (forever without one), then closes the listener and every connection.

    Args:
        ready: called once listening, with the bound address: ``(host, port)`` or the path.

    Raises:
        ConnectionSpecError: a spec is malformed.
        ServerError: ``listen`` cannot be listened on.
    """
    listen_spec, upstream_spec = _as_spec(listen), _as_spec(upstream)
    listener = listening.listen(ServerOptions(spec=listen_spec, socket_activation=False))
    recorder: _Recorder | None = None
    server: asyncio.Server | None = None
    try:
        recorder = _Recorder(upstream_spec, RecordingWriter(out, upstream_spec))
        server = await asyncio.start_server(recorder.serve, sock=listener.sock, limit=READ_SIZE)
        _LOG.info(
            "recording", listen=listener.description, upstream=str(upstream_spec), out=str(out)
        )
        if ready is not None:
            ready(listener.sock.getsockname())
        await (stop or asyncio.Event()).wait()
    finally:
        if server is not None:
            server.close()
        if recorder is not None:
            await recorder.close()
        listener.close()


def record_sync(
    listen: str | ConnectionSpec,
    upstream: str | ConnectionSpec,
    out: str | Path,
    *,
    ready: Callable[[Any], None] | None = None,
) -> None:
    """Run :func:`record` until SIGINT or SIGTERM (the command line; main thread only)."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        signals = (signal.SIGINT, signal.SIGTERM)
        previous = {signum: signal.getsignal(signum) for signum in signals}
        for signum in signals:
            loop.add_signal_handler(signum, stop.set)
        try:
            await record(listen, upstream, out, ready=ready, stop=stop)
        finally:
            for signum in signals:
                loop.remove_signal_handler(signum)
                if previous[signum] is not None:  # None: set outside Python; leave it
                    signal.signal(signum, previous[signum])

    asyncio.run(main())
