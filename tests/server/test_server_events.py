"""Events, context, modifications and reply aggregation, through the server over a real socket."""

from __future__ import annotations

import asyncio
import io
from typing import Any

from milterapp.app import App
from milterapp.constants import ActionFlag
from milterapp.context import Context
from milterapp.errors import ActionNotNegotiated, LocalProtocolError
from milterapp.events import (
    Abort,
    Body,
    Connect,
    ConnectionOpened,
    Data,
    EndOfHeaders,
    EndOfMessage,
    EnvFrom,
    EnvRcpt,
    Event,
    Header,
    Macros,
    Quit,
    Unknown,
)
from milterapp.handlers import EVENT_NAMES
from milterapp.protocol.mta import DEFAULT_OFFER
from milterapp.replies import (
    Accept,
    AddHeader,
    AddRecipient,
    ChangeHeader,
    ChangeSender,
    Continue,
    DeleteRecipient,
    Discard,
    InsertHeader,
    Quarantine,
    Reject,
    ReplaceBody,
    TempFail,
)
from tests.server.support import (
    CLIENT,
    HELO,
    connect,
    run,
    running_server,
    send,
    send_message,
    start_session,
)

# --- every event reaches its handler ---------------------------------------------------


def test_events_reach_handlers_with_models_and_context() -> None:
    app = App("events")
    seen: list[tuple[str, Event]] = []
    contexts: list[Context] = []
    snapshots: dict[str, Any] = {}
    closed = asyncio.Event()

    def recorder(name: str) -> Any:
        def handler(event: Event, ctx: Context) -> None:
            seen.append((name, event))
            contexts.append(ctx)
            if name == "connect":
                snapshots["connect"] = (
                    ctx.client,
                    ctx.macros["client_addr"],
                    ctx.macros["{client_addr}"],
                    ctx.macros.get("j"),
                    ctx.macros.get("{j}"),
                )
            elif name == "helo":
                snapshots["helo"] = (ctx.client, ctx.helo)
            elif name == "eom":
                message = ctx.message
                snapshots["eom"] = (
                    message.sender,
                    list(message.recipients),
                    list(message.headers),
                    message.queue_id,
                    message.body_size,
                    ctx.options is not None and ctx.options.version,
                )
            elif name == "abort":
                snapshots["abort"] = (ctx.message.sender, list(ctx.message.recipients))
            elif name == "unknown" and "eom" in snapshots:
                snapshots["after_abort"] = (
                    ctx.message.begun,
                    ctx.message.recipients,
                    ctx.message.queue_id,
                )
            elif name == "close":
                closed.set()

        return handler

    for name in EVENT_NAMES:
        app.add_handler(name, recorder(name))

    first_sender = EnvFrom.from_raw("<alice@example.org>", ["SIZE=1234", "BODY=8BITMIME"])
    recipients = [EnvRcpt(address="bob@example.net"), EnvRcpt.from_raw("<carol@example.net>")]
    headers = [Header(name="From", value="alice@example.org"), Header(name="Subject", value="hi")]
    chunks = [Body(chunk=b"Hello\r\n"), Body(chunk=b"Bye\r\n")]
    second_sender = EnvFrom(address="dave@example.org")

    async def main() -> None:
        async with running_server(app) as server, await connect(server) as client:
            local_port = client.writer.get_extra_info("sockname")[1]
            await client.negotiate()
            conversation: list[Event] = [
                Macros(stage="C", values={"{client_addr}": "192.0.2.10", "j": "mx.example.org"}),
                CLIENT,
                HELO,
                Unknown(line="XFOO bar"),
                first_sender,
                *recipients,
                Data(),
                *headers,
                EndOfHeaders(),
                *chunks,
                Macros(stage="E", values={"i": "4F2A1C"}),
                EndOfMessage(),
                second_sender,
                recipients[0],
                Abort(),
                Unknown(line="NOOP"),
            ]
            answers = await client.send_all(conversation)
            for event, answer in zip(conversation, answers, strict=True):
                if isinstance(event, Macros | Abort):
                    assert answer is None
                else:
                    assert answer is not None
                    assert answer.verdict == Continue(), event
            await client.close()
            await closed.wait()
            opened = seen[0][1]
            assert isinstance(opened, ConnectionOpened)
            assert opened.peer == f"127.0.0.1:{local_port}"

    run(main())

    names = [name for name, _ in seen]
    assert names == [
        "open",
        "negotiate",
        "connect",
        "helo",
        "unknown",
        "envfrom",
        "envrcpt",
        "envrcpt",
        "data",
        "header",
        "header",
        "eoh",
        "body",
        "body",
        "eom",
        "envfrom",
        "envrcpt",
        "abort",
        "unknown",
        "close",
    ]
    events = [event for _, event in seen]
    assert events[1] == DEFAULT_OFFER
    assert events[2:15] == [
        CLIENT,
        HELO,
        Unknown(line="XFOO bar"),
        first_sender,
        *recipients,
        Data(),
        *headers,
        EndOfHeaders(),
        *chunks,
        EndOfMessage(),
    ]
    assert events[15:] == [
        second_sender,
        recipients[0],
        Abort(),
        Unknown(line="NOOP"),
        Quit(),
    ]
    assert all(ctx is contexts[0] for ctx in contexts)  # one context per connection
    assert snapshots["connect"] == (
        CLIENT,
        "192.0.2.10",
        "192.0.2.10",
        "mx.example.org",
        "mx.example.org",
    )
    assert snapshots["helo"] == (CLIENT, HELO.name)
    assert snapshots["eom"] == (first_sender, recipients, headers, "4F2A1C", 12, 6)
    assert snapshots["abort"] == (second_sender, [recipients[0]])
    assert snapshots["after_abort"] == (False, [], None)


def test_context_state_persists_and_message_resets_between_messages() -> None:
    app = App("state")
    observed: list[tuple[int, object, list[str], str | None]] = []

    @app.on("envfrom")
    def mark(event: EnvFrom, ctx: Context) -> None:
        ctx.state["messages"] = ctx.state.get("messages", 0) + 1
        observed.append(
            (
                ctx.state["messages"],
                getattr(ctx.message, "note", None),
                [r.address for r in ctx.message.recipients],
                ctx.message.queue_id,
            )
        )
        ctx.message.note = f"message {ctx.state['messages']}"  # type: ignore[attr-defined]

    @app.on("eom")
    def stamp(event: EndOfMessage, ctx: Context) -> None:
        assert ctx.message.note == f"message {ctx.state['messages']}"  # type: ignore[attr-defined]
        ctx.add_header("X-Seen", str(ctx.state["messages"]))

    async def main() -> None:
        async with running_server(app) as server, await connect(server) as client:
            await start_session(client)
            for number in (1, 2, 3):
                answer = await send_message(
                    client, recipients=[f"r{number}@example.net"], mail_macros={"i": f"Q{number}"}
                )
                assert answer.modifications == [AddHeader(name="X-Seen", value=str(number))]
                assert answer.verdict == Continue()

    run(main())
    # Fresh message each time (no note, no old recipients); the queue id of this MAIL.
    assert observed == [(1, None, [], "Q1"), (2, None, [], "Q2"), (3, None, [], "Q3")]


# --- modifications --------------------------------------------------------------------------


def test_modifications_arrive_in_order_before_verdict() -> None:
    app = App("modifier")

    @app.on("eom")
    def modify(event: EndOfMessage, ctx: Context) -> None:
        ctx.add_header("X-Added", "1")
        ctx.insert_header(0, "X-Top", "first")
        ctx.change_header("Subject", "changed")
        ctx.change_header("Received", "second one", 2)
        ctx.delete_header("X-Old")
        ctx.replace_body(b"new body\r\n")
        ctx.add_recipient("carol@example.net")
        ctx.add_recipient("dave@example.net", "NOTIFY=NEVER")
        ctx.delete_recipient("<bob@example.net>")
        ctx.change_sender("bounce@example.org", "SIZE=10")
        ctx.quarantine("held for review")

    expected = [
        AddHeader(name="X-Added", value="1"),
        InsertHeader(index=0, name="X-Top", value="first"),
        ChangeHeader(name="Subject", value="changed", index=1),
        ChangeHeader(name="Received", value="second one", index=2),
        ChangeHeader(name="X-Old", value="", index=1),
        ReplaceBody(chunk=b"new body\r\n"),
        AddRecipient(address="carol@example.net"),
        AddRecipient(address="dave@example.net", args="NOTIFY=NEVER"),
        DeleteRecipient(address="<bob@example.net>"),
        ChangeSender(address="bounce@example.org", args="SIZE=10"),
        Quarantine(reason="held for review"),
    ]

    async def main() -> None:
        async with running_server(app) as server, await connect(server) as client:
            await start_session(client)
            answer = await send_message(client)
            assert answer.modifications == expected
            assert answer.verdict == Continue()
            # Nothing stays queued for the next message: it gets its own modifications only.
            again = await send_message(client)
            assert again.modifications == expected

    run(main())


def test_modifications_are_sent_with_accept_but_not_with_reject() -> None:
    app = App("verdicts")

    @app.on("eom")
    def modify(event: EndOfMessage, ctx: Context) -> Accept | Reject:
        ctx.add_header("X-Verdict", "given")
        ctx.state["n"] = ctx.state.get("n", 0) + 1
        return Accept() if ctx.state["n"] == 1 else Reject()

    async def main() -> None:
        async with running_server(app) as server, await connect(server) as client:
            await start_session(client)
            accepted = await send_message(client)
            assert accepted.modifications == [AddHeader(name="X-Verdict", value="given")]
            assert accepted.verdict == Accept()
            rejected = await send_message(client)
            assert rejected.modifications == []
            assert rejected.verdict == Reject()

    run(main())


def test_replace_body_from_large_file_is_sent_in_several_packets() -> None:
    app = App("body")
    new_body = bytes(range(256)) * 600  # 153,600 bytes: more than two 64 KiB packets

    @app.on("eom")
    def replace(event: EndOfMessage, ctx: Context) -> None:
        ctx.add_header("X-Before", "body")
        ctx.replace_body(io.BytesIO(new_body))
        ctx.add_header("X-After", "body")

    async def main() -> None:
        async with running_server(app) as server, await connect(server) as client:
            await start_session(client)
            answer = await send_message(client)
            mods = answer.modifications
            assert mods[0] == AddHeader(name="X-Before", value="body")
            assert mods[-1] == AddHeader(name="X-After", value="body")
            bodies = mods[1:-1]
            assert len(bodies) == 3
            assert all(isinstance(mod, ReplaceBody) for mod in bodies)
            assert all(len(mod.chunk) <= 65535 for mod in bodies)  # type: ignore[union-attr]
            assert b"".join(mod.chunk for mod in bodies) == new_body  # type: ignore[union-attr]
            assert answer.verdict == Continue()

    run(main())


def test_replace_body_with_large_bytes_is_split_in_order() -> None:
    app = App("body-bytes")
    new_body = b"".join(b"line %06d\r\n" % n for n in range(10_000))  # 130,000 bytes

    @app.on("eom")
    def replace(event: EndOfMessage, ctx: Context) -> None:
        ctx.replace_body(new_body)

    async def main() -> None:
        async with running_server(app) as server, await connect(server) as client:
            await start_session(client)
            answer = await send_message(client)
            assert len(answer.modifications) == 2
            assert b"".join(m.chunk for m in answer.modifications) == new_body  # type: ignore[union-attr]
            assert answer.verdict == Continue()

    run(main())


def test_modification_outside_eom_fails_the_handler_with_tempfail() -> None:
    app = App("early")
    errors: list[Exception] = []

    @app.on("envfrom")
    def too_early(event: EnvFrom, ctx: Context) -> None:
        try:
            ctx.add_header("X-Early", "1")
        except LocalProtocolError as exc:
            errors.append(exc)
            raise

    @app.on("eom")
    def stamp(event: EndOfMessage, ctx: Context) -> None:
        ctx.add_header("X-Late", "1")

    async def main() -> None:
        async with running_server(app) as server, await connect(server) as client:
            await start_session(client)
            answer = await send_message(client)
            assert answer.modifications == []
            assert answer.verdict == TempFail()

    run(main())
    assert len(errors) == 1
    assert "end-of-message" in str(errors[0])


def test_modification_not_negotiated_tempfails_and_connection_goes_on() -> None:
    app = App("narrow", actions=ActionFlag.ADDHDRS)
    errors: list[Exception] = []

    @app.on("eom")
    def modify(event: EndOfMessage, ctx: Context) -> None:
        ctx.state["n"] = ctx.state.get("n", 0) + 1
        ctx.add_header("X-Number", str(ctx.state["n"]))
        if ctx.state["n"] == 1:
            try:
                ctx.change_sender("other@example.org")
            except ActionNotNegotiated as exc:
                errors.append(exc)
                raise

    async def main() -> None:
        async with running_server(app) as server, await connect(server) as client:
            await start_session(client)
            assert client.mta.options is not None
            assert client.mta.options.actions == ActionFlag.ADDHDRS
            first = await send_message(client)
            assert first.modifications == []  # the header queued before the failure is dropped
            assert first.verdict == TempFail()
            second = await send_message(client)
            assert second.modifications == [AddHeader(name="X-Number", value="2")]
            assert second.verdict == Continue()

    run(main())
    assert len(errors) == 1
    assert errors[0].action == "CHGFROM"  # type: ignore[attr-defined]


# --- aggregation of several handlers ----------------------------------------------------


def test_aggregation_later_reject_wins_over_none() -> None:
    app = App("chain")
    calls: list[str] = []

    @app.on("envfrom")
    def first(event: EnvFrom) -> None:
        calls.append("first")

    @app.on("envfrom")
    def second(event: EnvFrom) -> Reject:
        calls.append("second")
        return Reject(code=550, xcode="5.7.1", text="no")

    async def main() -> None:
        async with running_server(app) as server, await connect(server) as client:
            await start_session(client)
            answer = await send_message(client)
            assert answer.verdict == Reject(code=550, xcode="5.7.1", text="no")

    run(main())
    assert calls == ["first", "second"]


def test_aggregation_first_reject_stops_the_chain() -> None:
    app = App("chain")
    calls: list[str] = []

    @app.on("envfrom")
    def first(event: EnvFrom) -> Reject:
        calls.append("first")
        return Reject(code=554, text="go away")

    @app.on("envfrom")
    def second(event: EnvFrom) -> None:
        calls.append("second")

    async def main() -> None:
        async with running_server(app) as server, await connect(server) as client:
            await start_session(client)
            answer = await send_message(client)
            assert answer.verdict == Reject(code=554, text="go away")

    run(main())
    assert calls == ["first"]


def test_aggregation_accept_and_none_give_accept() -> None:
    app = App("chain")

    @app.on("envfrom")
    def indifferent(event: EnvFrom) -> None:
        return None

    @app.on("envfrom")
    def accept(event: EnvFrom) -> Accept:
        return Accept()

    @app.on("eom")
    def never(event: EndOfMessage) -> None:
        raise AssertionError("an accepted message gets no more events")

    async def main() -> None:
        async with running_server(app) as server, await connect(server) as client:
            await start_session(client)
            answer = await send_message(client)
            assert answer.verdict == Accept()

    run(main())


def test_aggregation_reject_at_envrcpt_refuses_one_recipient() -> None:
    app = App("recipients")
    accepted: list[str] = []

    @app.on("envrcpt")
    def check(event: EnvRcpt, ctx: Context) -> Reject | None:
        if event.address.startswith("nobody@"):
            return Reject(code=550, xcode="5.1.1", text="no such user")
        accepted.append(event.address)
        return None

    @app.on("eom")
    def stamp(event: EndOfMessage, ctx: Context) -> None:
        ctx.add_header("X-Checked", "yes")

    async def main() -> None:
        async with running_server(app) as server, await connect(server) as client:
            await start_session(client)
            answers = [
                await send(client, event)
                for event in (
                    EnvFrom(address="alice@example.org"),
                    EnvRcpt(address="nobody@example.net"),
                    EnvRcpt(address="bob@example.net"),
                    Data(),
                    EndOfHeaders(),
                    EndOfMessage(),
                )
            ]
            verdicts = [answer.verdict if answer else None for answer in answers]
            assert verdicts[1] == Reject(code=550, xcode="5.1.1", text="no such user")
            assert verdicts[2] == Continue()
            assert verdicts[-1] == Continue()
            eom = answers[-1]
            assert eom is not None
            assert eom.modifications == [AddHeader(name="X-Checked", value="yes")]

    run(main())
    assert accepted == ["bob@example.net"]


def test_aggregation_discard_at_connect_is_invalid_and_tempfails() -> None:
    app = App("connect-discard")

    @app.on("connect")
    def discard(event: Connect) -> Discard:
        return Discard()

    async def main() -> None:
        async with running_server(app) as server, await connect(server) as client:
            await client.negotiate()
            answer = await client.send(CLIENT)
            assert answer is not None
            assert answer.verdict == TempFail()

    run(main())


def test_aggregation_discard_at_envfrom_is_sent() -> None:
    app = App("discard")

    @app.on("envfrom")
    def discard(event: EnvFrom) -> Discard:
        return Discard()

    async def main() -> None:
        async with running_server(app) as server, await connect(server) as client:
            await start_session(client)
            answer = await send_message(client)
            assert answer.verdict == Discard()
            # The connection goes on with the next message.
            again = await send_message(client)
            assert again.verdict == Discard()

    run(main())
