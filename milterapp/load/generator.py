"""A load generator that speaks the MTA side as Postfix does, to measure any milter.

Each connection negotiates, sends CONNECT and HELO, then messages: MAIL with one ESMTP
argument, recipients, DATA, headers, end of headers, the body in 64 KiB chunks and end of
message, each command after the macros Postfix sends for it, and ABORT between messages as
Postfix does; after ``messages_per_connection`` messages it quits and reconnects. Commands the
milter asked not to receive are not sent, and commands it asked not to answer are not waited
for (negotiation decides, as with a real MTA).

Every packet is encoded once, after the first negotiation: per message the generator only
writes prepared bytes and reads the (small) replies, and several processes share the
connections so that the generator is not what is measured. A message's latency runs from its
first write to the last packet of its end-of-message answer. ``milterapp bench`` is the
command line of this module; bench/compare.py runs it against other milter libraries.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections import Counter
from typing import Any, Final

from milterapp.load.result import LoadOptions, LoadResult
from milterapp.load.script import ABORT, MODIFICATIONS, PROGRESS, QUIT, VERDICTS, Script, prepare
from milterapp.protocol.mta import DEFAULT_OFFER, MtaConnection
from milterapp.server.loops import run_in_loop
from milterapp.spec import ConnectionSpec

__all__ = ["LoadOptions", "LoadResult", "run_load"]

#: A run stops after this many errors (a milter that is down, say).
_MAX_ERRORS: Final = 100


class _Generator:
    """One process's connections and what they measured."""

    def __init__(self, options: LoadOptions, messages: int) -> None:
        self.options = options
        self.spec = ConnectionSpec.parse(options.spec)
        self.quota = messages  # 0: until the duration is over
        self.started = 0
        self.window = (0.0, float("inf"))
        self.done = 0
        self.latencies: list[float] = []
        self.outcomes: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.scripts: tuple[Script, Script] | None = None
        self.stopping = False

    def more(self) -> bool:
        """Whether another message may start."""
        return not self.stopping and not (self.quota and self.started >= self.quota)

    def error(self, kind: str) -> None:
        self.errors[kind] += 1
        if self.errors.total() >= _MAX_ERRORS:
            self.stopping = True

    async def connection(self) -> None:
        """Connect and run sessions, one after another, until told to stop."""
        loop = asyncio.get_running_loop()
        spec = self.spec
        while self.more():
            client = _Client(self, loop)

            def protocol(client: _Client = client) -> _Client:
                return client

            try:
                async with asyncio.timeout(self.options.timeout):
                    if spec.scheme == "unix":
                        assert spec.path is not None
                        await loop.create_unix_connection(protocol, spec.path)
                    else:
                        assert spec.connect_host is not None
                        assert spec.port is not None
                        await loop.create_connection(protocol, spec.connect_host, spec.port)
            except (OSError, TimeoutError) as exc:
                self.error(f"connect: {type(exc).__name__}")
                continue
            await client.finished


class _Client(asyncio.Protocol):
    """One connection: writes the prepared packets, reads the answers, times messages."""

    def __init__(self, generator: _Generator, loop: asyncio.AbstractEventLoop) -> None:
        self.generator = generator
        self.loop = loop
        self.finished: asyncio.Future[None] = loop.create_future()
        self.transport: asyncio.Transport | None = None
        self.mta: MtaConnection | None = MtaConnection(DEFAULT_OFFER)  # until negotiated
        self.script: Script = []
        self.step = 0
        self.buffer = b""
        self.messages = 0
        self.in_message = False
        self.started = 0.0
        self.modifications: Counter[str] = Counter()
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        assert self.mta is not None
        self._write(self.mta.send(self.mta.offer))

    def _write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)
        if self.timer is not None:
            self.timer.cancel()
        self.timer = self.loop.call_later(self.generator.options.timeout, self._timed_out)

    def _timed_out(self) -> None:
        self.generator.error("timeout")
        self._close()

    def _close(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        if self.in_message or self.mta is not None:
            self.generator.error("closed by the milter")
        if not self.finished.done():
            self.finished.set_result(None)

    def data_received(self, data: bytes) -> None:
        if self.mta is not None:
            self._negotiating(data)
            return
        buffer = self.buffer + data if self.buffer else data
        pos = 0
        size = len(buffer)
        while size - pos >= 5:
            length = int.from_bytes(buffer[pos : pos + 4], "big")
            if size - pos < 4 + length:
                break
            code = buffer[pos + 4]
            pos += 4 + length
            verdict = VERDICTS.get(code)
            if verdict is None:
                if code in MODIFICATIONS:
                    self.modifications[MODIFICATIONS[code]] += 1
                elif code != PROGRESS:  # no MTA would take it: the milter is broken
                    self.generator.error(f"unexpected reply {chr(code)!r}")
                    self._close()
                    return
                continue
            self._answered(verdict)
            if self.transport is None or self.transport.is_closing():
                return
        self.buffer = buffer[pos:]

    def _negotiating(self, data: bytes) -> None:
        mta = self.mta
        assert mta is not None
        try:
            mta.receive_data(data)
            mta.collect_answer()
        except ValueError:  # a protocol error: the milter's negotiation reply is bad
            self.generator.error("bad negotiation reply")
            self._close()
            return
        if mta.options is None:
            return
        generator = self.generator
        if generator.scripts is None:  # every connection negotiates alike: prepare once
            options = generator.options
            generator.scripts = prepare(
                mta,
                recipients=options.recipients,
                headers=options.headers,
                body_size=options.body_size,
            )
        self.mta = None
        self.script = generator.scripts[0]
        self.step = -1
        self._next()

    def _next(self) -> None:
        """Write the next prepared packets; go on at once if no answer is due."""
        while True:
            self.step += 1
            if self.step == len(self.script):
                self._script_done()
                return
            data, answered = self.script[self.step]
            self._write(data)
            if answered:
                return

    def _answered(self, verdict: str) -> None:
        if verdict not in ("continue", "skip"):
            self._script_done(verdict)  # refused (or accepted) before the end
            return
        self._next()

    def _script_done(self, verdict: str = "continue") -> None:
        generator = self.generator
        if self.in_message:
            finished = time.perf_counter()
            self.in_message = False
            if generator.window[0] <= finished <= generator.window[1]:
                generator.done += 1
                generator.latencies.append((finished - self.started) * 1000)
                generator.outcomes[verdict] += 1
                generator.outcomes.update(self.modifications)
            self.messages += 1
            self.modifications.clear()
        elif verdict != "continue":  # refused at connect or helo
            generator.outcomes[f"connection {verdict}"] += 1
            self._quit()
            return
        if self.messages >= generator.options.messages_per_connection or not generator.more():
            self._quit()
            return
        if self.messages:
            assert self.transport is not None
            self.transport.write(ABORT)
        generator.started += 1
        self.in_message = True
        self.started = time.perf_counter()
        assert generator.scripts is not None
        self.script = generator.scripts[1]
        self.step = -1
        self._next()

    def _quit(self) -> None:
        assert self.transport is not None
        self.transport.write(ABORT + QUIT)
        self._close()


async def _run_process(options: LoadOptions, connections: int, messages: int) -> dict[str, Any]:
    generator = _Generator(options, messages)
    loop = asyncio.get_running_loop()
    begin = time.perf_counter()
    # How long this thread was busy over what is measured, to tell whether the generator
    # itself was the limit (the thread's, not the process's: the milter may run in this
    # process too). Measured from the end of the warm-up, when there is one.
    busy_at_start = _busy_time()

    def window_opens() -> None:
        nonlocal busy_at_start
        busy_at_start = _busy_time()

    if not messages:
        generator.window = (begin + options.warmup, begin + options.warmup + options.duration)
        if options.warmup:
            loop.call_later(options.warmup, window_opens)
    tasks = [loop.create_task(generator.connection()) for _ in range(connections)]
    if messages:
        await asyncio.wait(tasks)
        seconds = time.perf_counter() - begin
    else:
        await asyncio.wait(tasks, timeout=options.warmup + options.duration)
        seconds = options.duration
    busy = _busy_time() - busy_at_start
    generator.stopping = True
    await asyncio.wait(tasks, timeout=options.timeout)
    for task in tasks:
        task.cancel()
    return {
        "messages": generator.done,
        "seconds": seconds,
        "busy": min(1.0, busy / seconds) if seconds else 0.0,
        "latencies_ms": generator.latencies,
        "outcomes": dict(generator.outcomes),
        "errors": dict(generator.errors),
    }


def _busy_time() -> float:
    """Seconds this thread has run, or been ready to run and waited for a core: a generator
    that waits for a core is as much the limit as one that runs (Linux's schedstat; elsewhere
    the thread's CPU time alone)."""
    try:
        with open("/proc/thread-self/schedstat", encoding="ascii") as stats:
            running, waiting = stats.read().split()[:2]
    except (OSError, ValueError):
        return time.thread_time()
    return (int(running) + int(waiting)) / 1e9


def _child(options: LoadOptions, connections: int, messages: int, fd: int) -> None:
    status = 1
    try:
        result = run_in_loop(_run_process(options, connections, messages))
        with os.fdopen(fd, "w") as out:
            json.dump(result, out)
        status = 0
    finally:
        os._exit(status)


def run_load(options: LoadOptions) -> LoadResult:
    """Run the load described by ``options``; processes above 1 are forked (Linux)."""
    count = min(options.processes, options.connections)
    shares = _split(options.connections, count)
    quotas = _split(options.messages, count)
    if count == 1:
        parts = [run_in_loop(_run_process(options, shares[0], quotas[0]))]
    else:
        pipes = []
        for share, quota in zip(shares, quotas, strict=True):
            read_end, write_end = os.pipe()
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the child process
                os.close(read_end)
                _child(options, share, quota, write_end)
            os.close(write_end)
            pipes.append((pid, read_end))
        parts = []
        for pid, read_end in pipes:
            with os.fdopen(read_end) as result:
                text = result.read()
            os.waitpid(pid, 0)
            if not text:
                raise RuntimeError("a load generator process failed (see the messages above)")
            parts.append(json.loads(text))
    outcomes: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    latencies: list[float] = []
    for part in parts:
        outcomes.update(part["outcomes"])
        errors.update(part["errors"])
        latencies.extend(part["latencies_ms"])
    return LoadResult(
        messages=sum(part["messages"] for part in parts),
        seconds=max(part["seconds"] for part in parts),
        generator_busy=[part["busy"] for part in parts],
        latencies_ms=latencies,
        outcomes=dict(outcomes),
        errors=dict(errors),
    )


def _split(total: int, parts: int) -> list[int]:
    """``total`` in ``parts`` shares that differ by at most one."""
    return [total // parts + (index < total % parts) for index in range(parts)]
