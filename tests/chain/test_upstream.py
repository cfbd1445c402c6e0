"""UpstreamConnection: one conversation with one upstream milter, from the MTA's side.

Against a real App served on loopback or a unix socket, and against small hand-written
upstreams (a plain asyncio server) for what an App would never do: answer garbage, never
answer, close mid-message, break the protocol. Nothing sleeps to synchronise: tests wait on
events, on answers, or on the deadlines under test.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from milterapp.app import App
from milterapp.chain import UpstreamConnection, UpstreamFailure, UpstreamOptions
from milterapp.constants import ProtocolFlag
from milterapp.context import Context
from milterapp.events import (
    Data,
    EndOfHeaders,
    EndOfMessage,
    EnvFrom,
    EnvRcpt,
    Header,
    Macros,
    Negotiate,
)
from milterapp.protocol.mta import DEFAULT_OFFER
from milterapp.protocol.responses import encode_response
from milterapp.replies import AddHeader, Continue, NegotiationReply, Progress, Reject, Reply
from milterapp.server import MilterServer
from milterapp.spec import ConnectionSpec
from tests.server.support import CLIENT, HELO, message_events, run, running_server

#: Generous bound of a deadline test: the deadlines are a fraction of a second.
SLOW: float = 5.0

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def spec_of(server: MilterServer) -> str:
    address = server.address
    if isinstance(address, tuple):
        return f"inet:{address[1]}@[127.0.0.1]"
    return f"unix:{address}"


def upstream(spec: str, **options: Any) -> UpstreamOptions:
    return UpstreamOptions(name="up", spec=spec, **options)


@contextlib.asynccontextmanager
async def fake_upstream(handler: Handler) -> AsyncIterator[str]:
    """A hand-written upstream on a loopback port; yields its spec.

    On exit its connections are closed, and the first assertion a handler failed is raised.
    """
    tasks: set[asyncio.Task[Any]] = set()
    failures: list[BaseException] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        try:
            await handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client under test went away: what several tests cause
        except Exception as exc:  # noqa: BLE001 - raised again when the test ends
            failures.append(exc)
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield f"inet:{server.sockets[0].getsockname()[1]}@[127.0.0.1]"
    finally:
        server.close()
        await server.wait_closed()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    if failures:
        raise failures[0]


async def read_packet(reader: asyncio.StreamReader) -> tuple[str, bytes]:
    """One MTA packet: its command letter and payload."""
    size = int.from_bytes(await reader.readexactly(4), "big")
    payload = await reader.readexactly(size)
    return chr(payload[0]), payload[1:]


async def answer(writer: asyncio.StreamWriter, *replies: Reply) -> None:
    writer.write(b"".join(encode_response(reply) for reply in replies))
    await writer.drain()


async def negotiated(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    protocol: ProtocolFlag = ProtocolFlag.NONE,
) -> None:
    """Read the offer and accept it with ``protocol`` flags."""
    assert (await read_packet(reader))[0] == "O"
    await answer(writer, NegotiationReply(version=6, protocol=protocol))


async def begin_message(conn: UpstreamConnection) -> None:
    """Connect, HELO and a message up to its body, each answered Continue when answered."""
    for event in message_events(mail_macros={"i": "Q1"}):
        if isinstance(event, Macros):
            continue  # sent with MAIL below
        macros = Macros(stage="M", values={"i": "Q1"}) if isinstance(event, EnvFrom) else None
        for sent in (CLIENT, HELO) if isinstance(event, EnvFrom) else ():
            assert await conn.send(sent) is None
        reply = await conn.send(event, macros=macros)
        assert reply is None or reply.verdict == Continue(), reply


# --- against a real App --------------------------------------------------------------------


def queue_id_app() -> App:
    """Refuses one recipient; at end of message stamps the queue id macro of MAIL."""
    app = App("stamper")

    @app.on("envrcpt")
    def refuse(event: EnvRcpt, ctx: Context) -> Reject | None:
        if event.address == "blocked@example.net":
            return Reject(code=550, xcode="5.7.1", text="blocked")
        return None

    @app.on("eom")
    def stamp(event: EndOfMessage, ctx: Context) -> None:
        ctx.add_header("X-Queue-Id", ctx.macros.get("i", "none"))

    return app


def test_open_reflects_what_the_app_negotiated() -> None:
    async def main() -> None:
        app = App("eom-only")
        app.on("eom")(lambda event, ctx: None)
        async with (
            running_server(app) as server,
            await UpstreamConnection.open(upstream(spec_of(server))) as conn,
        ):
            assert conn.name == "up"
            assert conn.options.version == 6
            # milterapp always asks for the client and the envelope (no reply owed), and
            # declines the content it has no handler for.
            for flag in (ProtocolFlag.NOHDRS, ProtocolFlag.NOBODY, ProtocolFlag.NR_CONN):
                assert conn.reply.protocol & flag, flag
            assert not conn.reply.protocol & ProtocolFlag.NOCONNECT
            assert conn.declined(Header(name="Subject", value="hi"))
            assert not conn.declined(CLIENT)
            assert await conn.send(CLIENT) is None  # sent, no reply owed (NR_CONN)
            assert await conn.send(Header(name="Subject", value="hi")) is None

    run(main())


def test_a_whole_message_gets_the_apps_modification_and_verdicts() -> None:
    async def main() -> None:
        async with (
            running_server(queue_id_app()) as server,
            await UpstreamConnection.open(upstream(spec_of(server))) as conn,
        ):
            assert conn.options.reply_expected(ord("R"))
            await conn.send(CLIENT)
            await conn.send(HELO)
            mail = Macros(stage="M", values={"i": "4XyZ1"})
            await conn.send(EnvFrom(address="alice@example.org"), macros=mail)
            refused = await conn.send(EnvRcpt(address="blocked@example.net"))
            assert refused is not None
            assert isinstance(refused.verdict, Reject)
            accepted = await conn.send(EnvRcpt(address="bob@example.net"))
            assert accepted is not None
            assert accepted.verdict == Continue()
            for event in (Data(), Header(name="Subject", value="hi"), EndOfHeaders()):
                await conn.send(event)
            end = await conn.send(EndOfMessage(chunk=b"Hello.\r\n"))
        assert end is not None
        assert end.modifications == [AddHeader(name="X-Queue-Id", value="4XyZ1")]
        assert end.verdict == Continue()
        assert end.progress == 0

    run(main())


def test_a_unix_socket_spec_works(sock_dir: Path) -> None:
    async def main() -> None:
        async with running_server(queue_id_app(), f"unix:{sock_dir}/up.sock") as server:
            options = upstream(spec_of(server))
            assert options.spec.scheme == "unix"
            async with await UpstreamConnection.open(options) as conn:
                await conn.send(CLIENT)
                await conn.send(EnvFrom(address="a@example.org"), macros=Macros(stage="M"))
                end = await conn.send(EndOfMessage())
        assert end is not None
        assert end.modifications == [AddHeader(name="X-Queue-Id", value="none")]

    run(main())


def test_the_offer_version_is_capped_at_6() -> None:
    async def main() -> None:
        offer = Negotiate(version=7, actions=DEFAULT_OFFER.actions, protocol=DEFAULT_OFFER.protocol)
        async with (
            running_server(queue_id_app()) as server,
            await UpstreamConnection.open(upstream(spec_of(server)), offer) as conn,
        ):
            assert conn.reply.version == 6

    run(main())


# --- what is sent, seen by a hand-written upstream ------------------------------------------


def test_a_declined_event_sends_nothing_but_a_declined_mail_sends_its_macro_packet() -> None:
    received: list[str] = []
    done = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await negotiated(reader, writer, ProtocolFlag.NOHDRS | ProtocolFlag.NOMAIL)
        while (command := (await read_packet(reader))[0]) != "Q":
            received.append(command)
            if command == "N":
                await answer(writer, Continue())
        done.set()

    async def main() -> None:
        async with (
            fake_upstream(handle) as spec,
            await UpstreamConnection.open(upstream(spec)) as conn,
        ):
            assert await conn.send(EnvFrom(address="a@example.org")) is None
            assert await conn.send(Header(name="Subject", value="hi")) is None
            macros = Macros(stage="L", values={"x": "1"})
            assert await conn.send(Header(name="To", value="b"), macros=macros) is None
            eoh = await conn.send(EndOfHeaders())
            assert eoh is not None
            assert eoh.verdict == Continue()
            await conn.abort()
            await conn.close()
            await done.wait()  # the upstream read QUIT
        # D for MAIL (its command declined), the header's macros but no L, then N and A.
        assert received == ["D", "D", "N", "A"]

    run(main())


def test_progress_packets_are_counted_and_reported() -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await negotiated(reader, writer)
        assert (await read_packet(reader))[0] == "E"
        await answer(writer, Progress(), AddHeader(name="X-A", value="1"), Progress(), Continue())
        await reader.read()

    async def main() -> None:
        calls: list[int] = []
        async with (
            fake_upstream(handle) as spec,
            await UpstreamConnection.open(upstream(spec)) as conn,
        ):
            end = await conn.send(EndOfMessage(), on_progress=lambda: calls.append(1))
        assert end is not None
        assert end.progress == 2
        assert len(calls) == 2
        assert end.modifications == [AddHeader(name="X-A", value="1")]

    run(main())


# --- faults --------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_nothing_listening_is_unreachable_at_once(sock_dir: Path) -> None:
    async def main() -> None:
        port = free_port()
        started = time.monotonic()
        with pytest.raises(UpstreamFailure) as refused:
            await UpstreamConnection.open(upstream(f"inet:{port}@127.0.0.1"))
        assert time.monotonic() - started < SLOW
        assert refused.value.kind == "unreachable"
        assert str(refused.value) == f"upstream up: connection refused at inet:{port}@[127.0.0.1]"
        with pytest.raises(UpstreamFailure) as missing:
            await UpstreamConnection.open(upstream(f"unix:{sock_dir}/none.sock"))
        assert missing.value.kind == "unreachable"
        assert missing.value.detail == f"no such socket at unix:{sock_dir}/none.sock"

    run(main())


def test_a_listener_answering_garbage_is_not_a_milter() -> None:
    closed = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.0 400 Bad Request\r\n\r\n")
        await writer.drain()
        await reader.read()  # returns when the client has closed its socket
        closed.set()

    async def main() -> None:
        async with fake_upstream(handle) as spec:
            with pytest.raises(UpstreamFailure) as failure:
                await UpstreamConnection.open(upstream(spec))
            await closed.wait()
        assert failure.value.kind == "negotiation"
        assert failure.value.detail.startswith("not a milter: answered b'HTTP/1.0 400")

    run(main())


def test_a_listener_that_never_answers_times_out_and_is_closed() -> None:
    closed = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # never answers; returns when the client has closed its socket
        closed.set()

    async def main() -> None:
        async with fake_upstream(handle) as spec:
            started = time.monotonic()
            with pytest.raises(UpstreamFailure) as failure:
                await UpstreamConnection.open(upstream(spec, connect_timeout=0.3))
            elapsed = time.monotonic() - started
            await closed.wait()
        assert failure.value.kind == "timeout"
        assert failure.value.detail == "no answer to the negotiation within 0.3 s"
        assert 0.3 <= elapsed < SLOW

    run(main())


def test_an_eom_handler_that_never_returns_times_out_then_calls_fail_at_once() -> None:
    async def main() -> None:
        release = asyncio.Event()
        app = App("stuck")

        @app.on("eom")
        async def stuck(event: EndOfMessage, ctx: Context) -> None:
            await release.wait()

        async with running_server(app) as server:
            conn = await UpstreamConnection.open(upstream(spec_of(server), eom_timeout=0.3))
            started = time.monotonic()
            await begin_message(conn)
            with pytest.raises(UpstreamFailure) as failure:
                await conn.send(EndOfMessage())
            assert 0.3 <= time.monotonic() - started < SLOW
            assert failure.value.kind == "timeout"
            assert failure.value.detail == "no answer to end of message within 0.3 s"
            with pytest.raises(UpstreamFailure) as again:
                await conn.send(EndOfMessage())
            assert again.value.kind == "timeout"
            assert "already failed" in again.value.detail
            await conn.close()  # never raises on a failed connection
            release.set()

    run(main())


def test_progress_packets_restart_the_end_of_message_deadline() -> None:
    async def main() -> None:
        enough = asyncio.Event()
        app = App("slow", progress_interval=0.05)

        @app.on("eom")
        async def slow(event: EndOfMessage, ctx: Context) -> None:
            await enough.wait()
            ctx.add_header("X-Slow", "done")

        seen: list[int] = []

        def on_progress() -> None:
            seen.append(1)
            if len(seen) == 15:  # 0.75 s at least: well past the deadline of 0.5 s
                enough.set()

        async with running_server(app) as server:
            options = upstream(spec_of(server), eom_timeout=0.5)
            async with await UpstreamConnection.open(options) as conn:
                await begin_message(conn)
                started = time.monotonic()
                end = await conn.send(EndOfMessage(), on_progress=on_progress)
                elapsed = time.monotonic() - started
        assert end is not None
        assert end.progress == len(seen) >= 15
        assert elapsed > options.eom_timeout
        assert end.modifications == [AddHeader(name="X-Slow", value="done")]

    run(main())


def test_the_upstream_closing_mid_message_is_closed() -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await negotiated(reader, writer)
        assert (await read_packet(reader))[0] == "M"
        writer.close()

    async def main() -> None:
        async with (
            fake_upstream(handle) as spec,
            await UpstreamConnection.open(upstream(spec)) as conn,
        ):
            with pytest.raises(UpstreamFailure) as failure:
                await conn.send(EnvFrom(address="a@example.org"))
            assert failure.value.kind == "closed"
            assert str(failure.value) == "upstream up: closed the connection while MAIL was pending"
            with pytest.raises(UpstreamFailure) as again:
                await conn.send(EnvRcpt(address="b@example.net"))
            assert again.value.kind == "closed"

    run(main())


def test_an_answer_out_of_turn_is_a_protocol_failure() -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await negotiated(reader, writer)
        assert (await read_packet(reader))[0] == "M"
        await answer(writer, AddHeader(name="X-Early", value="1"))  # only at end of message
        await reader.read()

    async def main() -> None:
        async with (
            fake_upstream(handle) as spec,
            await UpstreamConnection.open(upstream(spec)) as conn,
        ):
            with pytest.raises(UpstreamFailure) as failure:
                await conn.send(EnvFrom(address="a@example.org"))
        assert failure.value.kind == "protocol"
        assert failure.value.detail.startswith("invalid answer to MAIL: ")

    run(main())


def test_calls_after_close_fail_and_close_twice_is_quiet() -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await negotiated(reader, writer)
        await reader.read()

    async def main() -> None:
        async with fake_upstream(handle) as spec:
            conn = await UpstreamConnection.open(upstream(spec))
            await conn.close()
            await conn.close()
            with pytest.raises(UpstreamFailure) as failure:
                await conn.send(EnvFrom(address="a@example.org"))
        assert failure.value.kind == "closed"

    run(main())


# --- options ---------------------------------------------------------------------------------


def test_options_parse_the_spec_and_keep_the_defaults() -> None:
    options = UpstreamOptions(name="opendkim", spec="inet:8891@127.0.0.1")
    assert options.spec == ConnectionSpec.parse("inet:8891@[127.0.0.1]")
    assert (options.connect_timeout, options.command_timeout, options.eom_timeout) == (5, 8, 120)
    assert options.on_failure == "tempfail"
    with pytest.raises(ValidationError):
        options.name = "other"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("field", "value", "says"),
    [
        ("name", "", "name"),
        ("name", "open dkim", "'open dkim'"),
        ("spec", "inet:notaport", "'inet:notaport'"),
        ("connect_timeout", 0, "greater than 0"),
        ("command_timeout", -1.0, "greater than 0"),
        ("eom_timeout", math.inf, "finite"),
        ("on_failure", "ignore", "'tempfail', 'accept' or 'reject'"),
    ],
)
def test_bad_options_are_refused_naming_the_field(field: str, value: object, says: str) -> None:
    given: dict[str, object] = {"name": "opendkim", "spec": "inet:8891@127.0.0.1", field: value}
    with pytest.raises(ValidationError) as refused:
        UpstreamOptions(**given)  # type: ignore[arg-type]
    errors = refused.value.errors()
    assert [error["loc"] for error in errors] == [(field,)]
    assert says in str(refused.value)
