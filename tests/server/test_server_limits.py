"""The server's limits, over a real socket: connections, macros per packet, headers per
message, header size, recipients per message. Each hit is answered as documented and logged."""

from __future__ import annotations

from typing import Any

import pytest
import structlog
from pydantic import ValidationError

from milterapp.app import App
from milterapp.cli import _parser
from milterapp.context import Context
from milterapp.events import EndOfMessage, EnvRcpt, Header, Macros
from milterapp.replies import Continue
from milterapp.server import ServerOptions
from milterapp.server.arguments import given_options
from milterapp.server.limits import (
    HEADER_TOO_LARGE,
    TOO_MANY_HEADERS,
    TOO_MANY_RECIPIENTS,
    Limits,
)
from tests.server.support import (
    CLIENT,
    connect,
    message_events,
    run,
    running_server,
    send,
    send_message,
    start_session,
    until,
)

HEADERS = [("From", "alice@example.org"), ("To", "bob@example.net"), ("Subject", "hi")]


def _events(logs: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [entry for entry in logs if entry["event"] == name]


class Recorder:
    """An app that records the headers and recipients its handlers see, per message."""

    def __init__(self, **options: Any) -> None:
        self.app = App("limits", **options)
        self.headers: list[str] = []
        self.recipients: list[str] = []
        self.messages: list[tuple[list[str], list[str]]] = []  # at end of message

        @self.app.on("header")
        def header(event: Header) -> None:
            self.headers.append(event.name)

        @self.app.on("envrcpt")
        def envrcpt(event: EnvRcpt) -> None:
            self.recipients.append(event.address)

        @self.app.on("eom")
        def eom(event: EndOfMessage, ctx: Context) -> None:
            message = ctx.message
            self.messages.append(
                ([h.name for h in message.headers], [r.address for r in message.recipients])
            )


# --- options -------------------------------------------------------------------------------


def test_limits_have_safe_defaults() -> None:
    options = ServerOptions()
    assert options.max_connections == 1000
    assert options.limits.max_macros_per_packet == 256
    assert options.limits.max_headers == 1000
    assert options.limits.max_header_size == 256 * 1024
    assert options.limits.max_recipients == 1000


@pytest.mark.parametrize(
    "name",
    [
        "max_connections",
        "max_macros_per_packet",
        "max_headers",
        "max_header_size",
        "max_recipients",
    ],
)
def test_limits_are_validated_and_zero_means_no_limit(name: str) -> None:
    with pytest.raises(ValidationError, match=name):
        ServerOptions.model_validate({name: -1})
    options = ServerOptions.model_validate({name: 0})
    holder = options.limits if name in Limits.model_fields else options  # limits given by name
    assert getattr(holder, name) == 0


def test_cli_passes_the_limits_on() -> None:
    args = _parser().parse_args(
        [
            "run",
            "mymilter:app",
            "--max-connections=5",
            "--max-macros-per-packet=6",
            "--max-headers=7",
            "--max-header-size=8",
            "--max-recipients=9",
        ]
    )
    assert given_options(args) == {
        "max_connections": 5,
        "max_macros_per_packet": 6,
        "max_headers": 7,
        "max_header_size": 8,
        "max_recipients": 9,
    }
    assert given_options(_parser().parse_args(["run", "mymilter:app"])) == {}


# --- max_connections -----------------------------------------------------------------------


def test_max_connections_closes_one_more_before_negotiation_then_accepts_again() -> None:
    recorder = Recorder()

    async def main() -> None:
        async with running_server(recorder.app, max_connections=2) as server:
            first, second = await connect(server), await connect(server)
            await first.negotiate()  # answered: both are being served
            await second.negotiate()
            async with await connect(server) as third:
                assert await third.closed_by_milter()  # EOF before any negotiation
            await first.close()
            await until(lambda: len(server._connections) == 1)
            async with await connect(server) as fourth:
                await start_session(fourth)
                assert (await send_message(fourth)).verdict == Continue()
            await second.close()

    with structlog.testing.capture_logs() as logs:
        run(main())
    refused = _events(logs, "connection_refused_limit")
    assert len(refused) == 1, logs
    assert refused[0]["connections"] == 2
    assert refused[0]["limit"] == 2
    assert recorder.messages == [(["From", "Subject"], ["bob@example.net"])]


def test_max_connections_zero_is_no_limit() -> None:
    app = App("unlimited")

    async def main() -> None:
        async with running_server(app, max_connections=0) as server:
            clients = [await connect(server) for _ in range(5)]
            for client in clients:
                await client.negotiate()
            for client in clients:
                await client.close()

    with structlog.testing.capture_logs() as logs:
        run(main())
    assert not _events(logs, "connection_refused_limit")


# --- max_macros_per_packet -----------------------------------------------------------------


def test_max_macros_per_packet_closes_only_that_connection() -> None:
    recorder = Recorder()
    too_many = {f"{{m{index}}}": "x" for index in range(5)}

    async def main() -> None:
        async with (
            running_server(recorder.app, max_macros_per_packet=4) as server,
            await connect(server) as good,
        ):
            await start_session(good)
            async with await connect(server) as bad:
                await bad.negotiate()
                assert await bad.send(Macros(stage="C", values=too_many)) is None
                assert await bad.closed_by_milter()
            # The other connection goes on, and four macros are fine.
            four = dict(list(too_many.items())[:4])
            answer = await send_message(good, mail_macros=four)
            assert answer.verdict == Continue()

    with structlog.testing.capture_logs() as logs:
        run(main())
    [hit] = _events(logs, "limit_exceeded")
    assert hit["limit"] == "max_macros_per_packet"
    assert hit["value"] == 4
    assert hit["count"] == 5
    assert _events(logs, "protocol_error")
    assert len(recorder.messages) == 1


# --- max_headers ---------------------------------------------------------------------------


def test_max_headers_tempfails_at_the_header_then_next_message_is_fine() -> None:
    recorder = Recorder()
    four = [*HEADERS, ("X-Extra", "1")]

    async def main() -> None:
        async with (
            running_server(recorder.app, max_headers=3) as server,
            await connect(server) as client,
        ):
            await start_session(client)
            answer = await send_message(client, headers=four)
            assert answer.verdict == TOO_MANY_HEADERS
            assert (await send_message(client, headers=HEADERS)).verdict == Continue()

    with structlog.testing.capture_logs() as logs:
        run(main())
    assert TOO_MANY_HEADERS.smtp_lines() == ["452 4.3.4 too many headers"]
    assert recorder.headers == ["From", "To", "Subject"] * 2  # the 4th never reached handlers
    assert recorder.messages == [(["From", "To", "Subject"], ["bob@example.net"])]
    [hit] = _events(logs, "limit_exceeded")
    assert (hit["limit"], hit["value"], hit["stage"]) == ("max_headers", 3, "header")


def test_max_headers_without_header_replies_tempfails_at_end_of_message() -> None:
    recorder = Recorder(no_reply={"header"})
    five = [*HEADERS, ("X-A", "1"), ("X-B", "2")]

    async def main() -> None:
        async with (
            running_server(recorder.app, max_headers=3) as server,
            await connect(server) as client,
        ):
            await start_session(client)
            for event in message_events(headers=five):
                answer = await send(client, event)
                assert answer is None or answer.verdict == Continue()
            answer = await client.send(EndOfMessage())
            assert answer is not None
            assert answer.verdict == TOO_MANY_HEADERS
            assert (await send_message(client, headers=HEADERS)).verdict == Continue()

    with structlog.testing.capture_logs() as logs:
        run(main())
    assert recorder.headers == ["From", "To", "Subject"] * 2
    # The refused message's end-of-message handler did not run; the next one's did.
    assert recorder.messages == [(["From", "To", "Subject"], ["bob@example.net"])]
    hits = _events(logs, "limit_exceeded")
    assert len(hits) == 1, hits  # logged once, though two headers were over
    assert hits[0]["limit"] == "max_headers"


# --- max_header_size -----------------------------------------------------------------------


def test_max_header_size_counts_bytes_of_name_and_value() -> None:
    recorder = Recorder()

    async def main() -> None:
        async with (
            running_server(recorder.app, max_header_size=20) as server,
            await connect(server) as client,
        ):
            await start_session(client)
            # 1 + 19 bytes: at the limit.
            fits = [("X", "a" * 19)]
            assert (await send_message(client, headers=fits)).verdict == Continue()
            # 11 characters, but "é" is two bytes in UTF-8: 21 bytes.
            over = [("From", "a@b.c"), ("X", "é" * 10)]
            answer = await send_message(client, headers=over)
            assert answer.verdict == HEADER_TOO_LARGE
            assert (await send_message(client, headers=fits)).verdict == Continue()

    with structlog.testing.capture_logs() as logs:
        run(main())
    assert HEADER_TOO_LARGE.smtp_lines() == ["452 4.3.4 header too large"]
    assert recorder.headers == ["X", "From", "X"]
    [hit] = _events(logs, "limit_exceeded")
    assert (hit["limit"], hit["value"], hit["size"]) == ("max_header_size", 20, 21)


# --- max_recipients ------------------------------------------------------------------------


def test_max_recipients_tempfails_each_recipient_above_and_keeps_the_others() -> None:
    recorder = Recorder()
    recipients = ["a@example.net", "b@example.net", "c@example.net", "d@example.net"]

    async def main() -> None:
        async with (
            running_server(recorder.app, max_recipients=2) as server,
            await connect(server) as client,
        ):
            await start_session(client)
            await send(client, Macros(stage="M", values={}))
            for event in message_events(recipients=recipients)[1:]:
                answer = await send(client, event)
                if isinstance(event, EnvRcpt) and event.address in recipients[2:]:
                    assert answer is not None
                    assert answer.verdict == TOO_MANY_RECIPIENTS
                else:
                    assert answer is None or answer.verdict == Continue(), (event, answer)
            answer = await client.send(EndOfMessage())
            assert answer is not None
            assert answer.verdict == Continue()

    with structlog.testing.capture_logs() as logs:
        run(main())
    assert TOO_MANY_RECIPIENTS.smtp_lines() == ["452 4.5.3 too many recipients"]
    assert recorder.recipients == recipients[:2]
    assert recorder.messages == [(["From", "Subject"], recipients[:2])]
    hits = _events(logs, "limit_exceeded")
    assert [(hit["limit"], hit["value"]) for hit in hits] == [("max_recipients", 2)] * 2


def test_max_recipients_without_recipient_replies_tempfails_the_message() -> None:
    recorder = Recorder(no_reply={"envrcpt"})
    recipients = ["a@example.net", "b@example.net", "c@example.net"]

    async def main() -> None:
        async with (
            running_server(recorder.app, max_recipients=2) as server,
            await connect(server) as client,
        ):
            await start_session(client)
            # Headers expect replies: the first one after the recipients gets the refusal.
            answer = await send_message(client, recipients=recipients)
            assert answer.verdict == TOO_MANY_RECIPIENTS
            assert (await send_message(client, recipients=recipients[:2])).verdict == (Continue())

    with structlog.testing.capture_logs() as logs:
        run(main())
    assert recorder.recipients == recipients[:2] * 2
    assert recorder.headers == ["From", "Subject"]  # only the second message's
    assert recorder.messages == [(["From", "Subject"], recipients[:2])]
    [hit] = _events(logs, "limit_exceeded")
    assert hit["limit"] == "max_recipients"


def test_max_recipients_applies_to_recipients_no_handler_reads() -> None:
    # An end-of-message-only app: RCPT comes without replies and is kept undecoded for the
    # context; the limit still holds, and the message is refused at end of message.
    app = App("eom-only")
    seen: list[list[str]] = []

    @app.on("eom")
    def record(event: EndOfMessage, ctx: Context) -> None:
        seen.append([rcpt.address for rcpt in ctx.message.recipients])

    recipients = ["a@example.net", "b@example.net", "c@example.net"]

    async def main() -> None:
        async with (
            running_server(app, max_recipients=2) as server,
            await connect(server) as client,
        ):
            await start_session(client)
            answer = await send_message(client, recipients=recipients)
            assert answer.verdict == TOO_MANY_RECIPIENTS
            second = await send_message(client, recipients=recipients[:2])
            assert second.verdict == Continue()

    with structlog.testing.capture_logs() as logs:
        run(main())
    assert seen == [recipients[:2]]  # the refused message ran no handler
    [hit] = _events(logs, "limit_exceeded")
    assert (hit["limit"], hit["stage"]) == ("max_recipients", "envrcpt")


def test_limits_apply_per_connection_session_and_message() -> None:
    recorder = Recorder()

    async def main() -> None:
        async with (
            running_server(recorder.app, max_recipients=1, max_headers=2) as server,
            await connect(server) as client,
        ):
            await start_session(client, client_event=CLIENT)
            for _ in range(3):  # each message starts from zero
                answer = await send_message(client, headers=HEADERS[:2])
                assert answer.verdict == Continue()

    with structlog.testing.capture_logs() as logs:
        run(main())
    assert not _events(logs, "limit_exceeded")
    assert len(recorder.messages) == 3


# --- headers kept as they came (no header handler, keep_message) ---------------------------


def test_headers_no_handler_reads_are_kept_as_received_and_limited_alike() -> None:
    """With keep_message and no header handler the server keeps each header's packet
    without decoding it; the limits apply to those as to decoded ones, and ctx.message
    gives the headers decoded when read."""
    seen: list[list[tuple[str, str]]] = []
    app = App("kept", keep_message=True)

    @app.on("eom")
    def eom(event: EndOfMessage, ctx: Context) -> None:
        seen.append([(h.name, h.value) for h in ctx.message.headers])

    async def main() -> None:
        async with (
            running_server(app, max_headers=3, max_header_size=24) as server,
            await connect(server) as client,
        ):
            await start_session(client)
            assert (await send_message(client, headers=HEADERS)).verdict == Continue()
            many = [*HEADERS, ("X-A", "1")]
            assert (await send_message(client, headers=many)).verdict == TOO_MANY_HEADERS
            large = [("From", "a@b.c"), ("X", "é" * 12)]  # 25 bytes
            assert (await send_message(client, headers=large)).verdict == HEADER_TOO_LARGE
            assert (await send_message(client, headers=HEADERS)).verdict == Continue()

    with structlog.testing.capture_logs() as logs:
        run(main())
    assert seen == [list(HEADERS)] * 2  # the refused messages' handler did not run
    hits = _events(logs, "limit_exceeded")
    assert [(hit["limit"], hit.get("size")) for hit in hits] == [
        ("max_headers", None),
        ("max_header_size", 25),
    ]
