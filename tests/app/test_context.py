"""Context (modifications, progress, new messages) and Message (envelope, body, as_email)."""

from __future__ import annotations

import asyncio
import email.parser
import io
import tempfile
from collections.abc import Callable, Coroutine, Iterator, Mapping
from typing import Any, ClassVar

import pytest
import structlog.testing
from pydantic import ValidationError

from milterapp.config import DEFAULT_SPOOL_THRESHOLD
from milterapp.constants import DEFAULT_MAX_DATA_SIZE, ActionFlag, ProtocolFlag
from milterapp.context import Context, Message
from milterapp.errors import ActionNotNegotiated, LocalProtocolError, NotAvailable
from milterapp.events import Connect, EnvFrom, EnvRcpt, Header, Helo
from milterapp.protocol.codec import encode_command
from milterapp.protocol.macros import MacroTable
from milterapp.protocol.negotiation import SessionOptions
from milterapp.replies import (
    AddHeader,
    AddRecipient,
    ChangeHeader,
    ChangeSender,
    DeleteRecipient,
    InsertHeader,
    Modification,
    Quarantine,
    ReplaceBody,
)


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    async def bounded() -> Any:
        async with asyncio.timeout(5):
            return await coro

    return asyncio.run(bounded())


# Messages and contexts made by a test; their spooled bodies are closed after it.
_MADE: list[Message | Context] = []


@pytest.fixture(autouse=True)
def _close_bodies() -> Iterator[None]:
    yield
    while _MADE:
        made = _MADE.pop()
        (made.message if isinstance(made, Context) else made).close()


def make_ctx(**kwargs: Any) -> Context:
    kwargs.setdefault("macros", {})
    ctx = Context(app_name="t", conn_id="1", peer="test", **kwargs)
    _MADE.append(ctx)
    return ctx


def make_message(macros: Mapping[str, str], spool_threshold: int | None) -> Message:
    message = Message(macros, spool_threshold)
    _MADE.append(message)
    return message


def at_eom(ctx: Context | None = None) -> Context:
    ctx = ctx or make_ctx()
    ctx.enter_eom(True)
    return ctx


def granted(actions: ActionFlag) -> SessionOptions:
    return SessionOptions(version=6, actions=actions, protocol=ProtocolFlag.NONE)


def queued(ctx: Context) -> list[Modification]:
    return list(ctx.take_modifications())


# Every modification method: (call, what it queues, the action it needs).
MODIFICATIONS: list[tuple[str, Callable[[Context], None], Modification, ActionFlag]] = [
    (
        "add_header",
        lambda ctx: ctx.add_header("X-Test", "yes"),
        AddHeader(name="X-Test", value="yes"),
        ActionFlag.ADDHDRS,
    ),
    (
        "insert_header",
        lambda ctx: ctx.insert_header(0, "X-Top", "first"),
        InsertHeader(index=0, name="X-Top", value="first"),
        ActionFlag.ADDHDRS,
    ),
    (
        "change_header",
        lambda ctx: ctx.change_header("Subject", "[SPAM] hi", 2),
        ChangeHeader(name="Subject", value="[SPAM] hi", index=2),
        ActionFlag.CHGHDRS,
    ),
    (
        "delete_header",
        lambda ctx: ctx.delete_header("X-Secret"),
        ChangeHeader(name="X-Secret", value="", index=1),
        ActionFlag.CHGHDRS,
    ),
    (
        "replace_body",
        lambda ctx: ctx.replace_body(b"new body\r\n"),
        ReplaceBody(chunk=b"new body\r\n"),
        ActionFlag.CHGBODY,
    ),
    (
        "replace_body_file",
        lambda ctx: ctx.replace_body(io.BytesIO(b"from a file\r\n")),
        ReplaceBody(chunk=b"from a file\r\n"),
        ActionFlag.CHGBODY,
    ),
    (
        "add_recipient",
        lambda ctx: ctx.add_recipient("new@example.org"),
        AddRecipient(address="new@example.org"),
        ActionFlag.ADDRCPT,
    ),
    (
        "add_recipient_with_args",
        lambda ctx: ctx.add_recipient("new@example.org", "NOTIFY=NEVER"),
        AddRecipient(address="new@example.org", args="NOTIFY=NEVER"),
        ActionFlag.ADDRCPT_PAR,
    ),
    (
        "delete_recipient",
        lambda ctx: ctx.delete_recipient("<old@example.org>"),
        DeleteRecipient(address="<old@example.org>"),
        ActionFlag.DELRCPT,
    ),
    (
        "change_sender",
        lambda ctx: ctx.change_sender("bounce@example.org"),
        ChangeSender(address="bounce@example.org"),
        ActionFlag.CHGFROM,
    ),
    (
        "change_sender_with_args",
        lambda ctx: ctx.change_sender("bounce@example.org", "SIZE=100"),
        ChangeSender(address="bounce@example.org", args="SIZE=100"),
        ActionFlag.CHGFROM,
    ),
    (
        "quarantine",
        lambda ctx: ctx.quarantine("suspicious attachment"),
        Quarantine(reason="suspicious attachment"),
        ActionFlag.QUARANTINE,
    ),
]
IDS = [name for name, *_ in MODIFICATIONS]
CALLS = [(call, expected, action) for _, call, expected, action in MODIFICATIONS]


# --- modifications ------------------------------------------------------------------------


@pytest.mark.parametrize(("call", "expected", "action"), CALLS, ids=IDS)
def test_modification_outside_eom_is_refused(
    call: Callable[[Context], None], expected: Modification, action: ActionFlag
) -> None:
    ctx = make_ctx()
    with pytest.raises(LocalProtocolError, match="end-of-message") as info:
        call(ctx)
    assert not isinstance(info.value, ActionNotNegotiated)
    assert type(expected).__name__ in str(info.value)
    assert queued(at_eom(ctx)) == []


@pytest.mark.parametrize(("call", "expected", "action"), CALLS, ids=IDS)
def test_modification_after_eom_is_refused_again(
    call: Callable[[Context], None], expected: Modification, action: ActionFlag
) -> None:
    ctx = at_eom()
    ctx.enter_eom(False)
    with pytest.raises(LocalProtocolError):
        call(ctx)


@pytest.mark.parametrize(("call", "expected", "action"), CALLS, ids=IDS)
def test_modification_inside_eom_is_queued(
    call: Callable[[Context], None], expected: Modification, action: ActionFlag
) -> None:
    ctx = at_eom()
    assert call(ctx) is None
    assert queued(ctx) == [expected]
    assert expected.required_action == action


@pytest.mark.parametrize(("call", "expected", "action"), CALLS, ids=IDS)
def test_modification_with_its_action_granted_is_queued(
    call: Callable[[Context], None], expected: Modification, action: ActionFlag
) -> None:
    ctx = at_eom()
    ctx.options = granted(action)
    call(ctx)
    assert queued(ctx) == [expected]


@pytest.mark.parametrize(("call", "expected", "action"), CALLS, ids=IDS)
def test_modification_without_its_action_is_refused(
    call: Callable[[Context], None], expected: Modification, action: ActionFlag
) -> None:
    ctx = at_eom()
    ctx.options = granted(ActionFlag.ALL & ~action)
    with pytest.raises(ActionNotNegotiated) as info:
        call(ctx)
    assert info.value.action == action.name
    assert isinstance(info.value, LocalProtocolError)
    assert str(action.name) in str(info.value)
    assert queued(ctx) == []


def test_only_addhdrs_granted() -> None:
    ctx = at_eom()
    ctx.options = granted(ActionFlag.ADDHDRS)
    ctx.add_header("X-A", "1")
    ctx.insert_header(1, "X-B", "2")
    with pytest.raises(ActionNotNegotiated) as info:
        ctx.change_header("Subject", "x")
    assert info.value.action == "CHGHDRS"
    with pytest.raises(ActionNotNegotiated) as info:
        ctx.quarantine("why")
    assert info.value.action == "QUARANTINE"
    assert queued(ctx) == [
        AddHeader(name="X-A", value="1"),
        InsertHeader(index=1, name="X-B", value="2"),
    ]


def test_add_recipient_with_args_needs_addrcpt_par() -> None:
    ctx = at_eom()
    ctx.options = granted(ActionFlag.ADDRCPT)
    ctx.add_recipient("plain@example.org")
    with pytest.raises(ActionNotNegotiated) as info:
        ctx.add_recipient("with-args@example.org", "NOTIFY=NEVER")
    assert info.value.action == "ADDRCPT_PAR"
    ctx.options = granted(ActionFlag.ADDRCPT_PAR)
    with pytest.raises(ActionNotNegotiated) as info:
        ctx.add_recipient("plain@example.org")
    assert info.value.action == "ADDRCPT"
    ctx.add_recipient("with-args@example.org", "NOTIFY=NEVER")
    assert queued(ctx) == [
        AddRecipient(address="plain@example.org"),
        AddRecipient(address="with-args@example.org", args="NOTIFY=NEVER"),
    ]


def test_before_negotiation_every_action_is_allowed() -> None:
    ctx = at_eom()
    assert ctx.options is None
    for _, call, _, _ in MODIFICATIONS:
        call(ctx)
    assert len(queued(ctx)) == len(MODIFICATIONS)


def test_take_modifications_yields_in_order_and_empties_the_queue() -> None:
    ctx = at_eom()
    for _, call, _, _ in MODIFICATIONS:
        call(ctx)
    assert queued(ctx) == [expected for _, _, expected, _ in MODIFICATIONS]
    assert queued(ctx) == []
    ctx.add_header("X-After", "1")
    assert queued(ctx) == [AddHeader(name="X-After", value="1")]


def test_delete_header_is_change_header_with_empty_value() -> None:
    ctx = at_eom()
    ctx.delete_header("Received", 3)
    assert queued(ctx) == [ChangeHeader(name="Received", value="", index=3)]


def test_change_header_index_defaults_to_one() -> None:
    ctx = at_eom()
    ctx.change_header("Subject", "new")
    assert queued(ctx) == [ChangeHeader(name="Subject", value="new", index=1)]


def test_replace_body_accepts_bytearray_and_memoryview() -> None:
    ctx = at_eom()
    ctx.replace_body(bytearray(b"one"))
    ctx.replace_body(memoryview(b"two"))
    assert queued(ctx) == [ReplaceBody(chunk=b"one"), ReplaceBody(chunk=b"two")]


def test_replace_body_with_bytes_is_one_modification_whatever_its_size() -> None:
    ctx = at_eom()
    data = bytes(range(256)) * 1000
    ctx.replace_body(data)
    assert queued(ctx) == [ReplaceBody(chunk=data)]  # the codec splits it into packets


def test_replace_body_file_is_chunked_at_max_data_size() -> None:
    ctx = at_eom()
    data = bytes(range(256)) * 586 + b"tail"  # 150,020 bytes
    ctx.replace_body(io.BytesIO(data))
    mods = list(ctx.take_modifications(65535))
    assert all(isinstance(mod, ReplaceBody) for mod in mods)
    chunks = [mod.chunk for mod in mods if isinstance(mod, ReplaceBody)]
    assert [len(chunk) for chunk in chunks] == [65535, 65535, len(data) - 2 * 65535]
    assert b"".join(chunks) == data


def test_replace_body_file_of_150000_bytes_gives_three_packets() -> None:
    ctx = at_eom()
    ctx.replace_body(io.BytesIO(b"x" * 150_000))
    mods = list(ctx.take_modifications(DEFAULT_MAX_DATA_SIZE))
    assert len(mods) == 3
    assert all(isinstance(mod, ReplaceBody) for mod in mods)
    assert all(len(mod.chunk) <= 65535 for mod in mods if isinstance(mod, ReplaceBody))


@pytest.mark.parametrize(
    ("size", "max_size", "expected"),
    [
        (1, 65535, [1]),
        (65535, 65535, [65535]),
        (65536, 65535, [65535, 1]),
        (2 * 65535, 65535, [65535, 65535]),
        (10, 3, [3, 3, 3, 1]),
        (300_000, 262143, [262143, 300_000 - 262143]),
    ],
)
def test_replace_body_file_chunk_sizes(size: int, max_size: int, expected: list[int]) -> None:
    ctx = at_eom()
    ctx.replace_body(io.BytesIO(b"y" * size))
    mods = list(ctx.take_modifications(max_size))
    assert [len(mod.chunk) for mod in mods if isinstance(mod, ReplaceBody)] == expected


def test_replace_body_with_an_empty_file_sends_one_empty_chunk() -> None:
    ctx = at_eom()
    ctx.replace_body(io.BytesIO(b""))
    assert queued(ctx) == [ReplaceBody(chunk=b"")]


def test_replace_body_file_is_read_when_sent_and_keeps_its_place_in_the_queue() -> None:
    ctx = at_eom()
    source = io.BytesIO()
    ctx.add_header("X-Before", "1")
    ctx.replace_body(source)
    ctx.quarantine("after")
    source.write(b"written after queuing")
    source.seek(0)
    assert queued(ctx) == [
        AddHeader(name="X-Before", value="1"),
        ReplaceBody(chunk=b"written after queuing"),
        Quarantine(reason="after"),
    ]


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("", "v"),
        ("Bad Name", "v"),
        ("Bad:Name", "v"),
        ("X-Tab\t", "v"),
        ("X-\u00e9", "v"),
        ("X-Test", "line one\nX-Injected: yes"),
        ("X-Test", "line one\r\n two"),
        ("X-Test", "nul\x00byte"),
        ("X-Test", "carriage\rreturn"),
    ],
    ids=repr,
)
def test_invalid_headers_are_refused_at_call_time(name: str, value: str) -> None:
    ctx = at_eom()
    with pytest.raises(ValidationError):
        ctx.add_header(name, value)
    with pytest.raises(ValidationError):
        ctx.insert_header(0, name, value)
    with pytest.raises(ValidationError):
        ctx.change_header(name, value)
    assert queued(ctx) == []


def test_invalid_delete_header_name_is_refused() -> None:
    ctx = at_eom()
    with pytest.raises(ValidationError):
        ctx.delete_header("Bad Name")


@pytest.mark.parametrize("value", ["", "folded\n\tvalue", "folded\n value", "caf\u00e9 \u2603"])
def test_valid_header_values(value: str) -> None:
    ctx = at_eom()
    ctx.add_header("X-Test", value)
    assert queued(ctx) == [AddHeader(name="X-Test", value=value)]


@pytest.mark.parametrize(
    "call",
    [
        lambda ctx: ctx.insert_header(-1, "X-Test", "v"),
        lambda ctx: ctx.change_header("X-Test", "v", -1),
        lambda ctx: ctx.add_recipient(""),
        lambda ctx: ctx.add_recipient("a@example.org\r\nRCPT TO:<b@example.org>"),
        lambda ctx: ctx.add_recipient("a@example.org", "NOTIFY=NEVER\n"),
        lambda ctx: ctx.delete_recipient(""),
        lambda ctx: ctx.change_sender(""),
        lambda ctx: ctx.quarantine(""),
        lambda ctx: ctx.quarantine("two\nlines"),
    ],
)
def test_other_invalid_modifications_are_refused(call: Callable[[Context], None]) -> None:
    ctx = at_eom()
    with pytest.raises(ValidationError):
        call(ctx)
    assert queued(ctx) == []


# --- progress -----------------------------------------------------------------------------


def test_progress_outside_eom_is_refused() -> None:
    calls: list[str] = []

    async def progress() -> None:
        calls.append("progress")

    ctx = make_ctx(progress=progress)
    with pytest.raises(LocalProtocolError, match="end-of-message"):
        run(ctx.progress())
    assert calls == []


def test_progress_inside_eom_calls_the_callback() -> None:
    calls: list[str] = []

    async def progress() -> None:
        calls.append("progress")

    ctx = at_eom(make_ctx(progress=progress))
    run(ctx.progress())
    run(ctx.progress())
    assert calls == ["progress", "progress"]


def test_progress_after_the_connection_ended_does_nothing() -> None:
    calls: list[str] = []

    async def progress() -> None:
        calls.append("progress")

    ctx = at_eom(make_ctx(progress=progress))
    ctx.detach()  # the connection is over
    run(ctx.progress())
    assert calls == []


def test_progress_without_a_callback_does_nothing() -> None:
    run(at_eom().progress())


# --- the message and new_message ----------------------------------------------------------


def test_context_starts_empty() -> None:
    ctx = make_ctx()
    assert ctx.app_name == "t"
    assert ctx.conn_id == "1"
    assert ctx.peer == "test"
    assert not ctx.client_known
    with pytest.raises(NotAvailable, match="before the connect event"):
        _ = ctx.client
    assert ctx.helo is None
    assert ctx.options is None
    assert ctx.state == {}
    with pytest.raises(NotAvailable, match="before MAIL FROM"):
        _ = ctx.message.sender
    assert not ctx.message.begun
    assert ctx.message.recipients == []
    assert ctx.message.headers == []
    assert ctx.message.body_size == 0


def test_new_message_resets_the_message_and_clears_modifications() -> None:
    ctx = at_eom(make_ctx(spool_threshold=100))
    old = ctx.message
    old.sender = EnvFrom(address="a@example.org")
    old.recipients.append(EnvRcpt(address="b@example.org"))
    old.headers.append(Header(name="Subject", value="hi"))
    old.append_body(b"body")
    old.score = 5  # type: ignore[attr-defined]
    ctx.state["seen"] = 1
    ctx.add_header("X-Queued", "1")
    ctx.new_message()
    new = ctx.message
    assert new is not old
    assert not new.begun
    assert new.recipients == []
    assert new.headers == []
    assert new.body_size == 0
    assert new.body_bytes() == b""
    assert not hasattr(new, "score")
    assert queued(ctx) == []
    assert ctx.state == {"seen": 1}  # per connection, not per message
    assert new.body_kept  # the spool threshold carries over


def test_new_message_closes_the_old_body() -> None:
    ctx = make_ctx(spool_threshold=100)
    old = ctx.message
    old.append_body(b"body")
    spool = old.body()
    ctx.new_message()
    assert spool.closed


def test_queue_id_from_plain_dict_macros() -> None:
    assert make_message({"i": "4XYZ12"}, None).queue_id == "4XYZ12"
    assert make_message({}, None).queue_id is None
    assert make_ctx(macros={"i": "ABC"}).message.queue_id == "ABC"


def test_queue_id_from_a_macro_table_with_braces() -> None:
    table = MacroTable()
    ctx = make_ctx(macros=table)
    assert ctx.message.queue_id is None
    table.define("M", {"{i}": "4XYZ12", "{mail_addr}": "a@example.org"})
    assert ctx.message.queue_id == "4XYZ12"  # looked up live, not copied
    table.define("E", {"i": "LATER"})
    assert ctx.message.queue_id == "LATER"
    ctx.new_message()
    assert ctx.message.queue_id == "LATER"


def test_enter_eom_binds_the_queue_id_to_the_log() -> None:
    table = MacroTable()
    table.define("M", {"{i}": "4XYZ12"})
    with structlog.testing.capture_logs() as logs:
        ctx = make_ctx(macros=table)
        ctx.log.info("before")
        ctx.enter_eom(True)
        ctx.log.info("during")
    assert "queue_id" not in logs[0]
    assert logs[1]["queue_id"] == "4XYZ12"
    assert logs[1]["conn_id"] == "1"
    assert logs[1]["peer"] == "test"


def test_bind_log_adds_to_what_the_log_is_bound_with() -> None:
    with structlog.testing.capture_logs() as logs:
        ctx = make_ctx()
        ctx.log.info("before")
        ctx.bind_log(client="192.0.2.1")
        ctx.log.info("after")
    assert "client" not in logs[0]
    assert logs[1]["client"] == "192.0.2.1"
    assert logs[1]["conn_id"] == "1"


def test_the_log_carries_the_client_once_known_even_undecoded() -> None:
    # The server keeps an unhandled CONNECT as its payload: the log decodes it when used.
    payload = encode_command(
        Connect(hostname="mx.example", family="4", port=25, address="192.0.2.9")
    )[5:]
    with structlog.testing.capture_logs() as logs:
        ctx = make_ctx()
        ctx.log.info("before")
        ctx.client = payload
        ctx.log.info("after")
    assert "client" not in logs[0]
    assert logs[1]["client"] == "192.0.2.9"
    assert ctx.client.hostname == "mx.example"
    assert ctx.client_known


def test_helo_sender_and_recipients_kept_undecoded_read_as_models() -> None:
    ctx = make_ctx()
    ctx.helo = encode_command(Helo(name="client.example"))[5:]
    ctx.message.sender_record = encode_command(EnvFrom.from_raw("<a@example.org>", ["SIZE=10"]))[5:]
    ctx.message.recipient_records.append(encode_command(EnvRcpt(address="b@example.org"))[5:])
    ctx.message.records_undecoded = True
    ctx.message.recipient_records.append(EnvRcpt(address="c@example.org"))
    assert ctx.helo == "client.example"
    assert ctx.message.sender == EnvFrom.from_raw("<a@example.org>", ["SIZE=10"])
    assert ctx.message.recipients == [
        EnvRcpt(address="b@example.org"),
        EnvRcpt(address="c@example.org"),
    ]
    assert ctx.message.begun


def test_an_apps_own_logger_keeps_what_the_server_binds_later() -> None:
    table = MacroTable()
    table.define("E", {"i": "4Q"})
    with structlog.testing.capture_logs() as logs:
        ctx = make_ctx(macros=table)
        ctx.log = ctx.log.bind(score=5)
        ctx.bind_log(client="192.0.2.1")
        ctx.enter_eom(True)
        ctx.log.info("done")
    assert logs[0]["score"] == 5
    assert logs[0]["client"] == "192.0.2.1"
    assert logs[0]["queue_id"] == "4Q"
    assert logs[0]["conn_id"] == "1"


# --- the body -----------------------------------------------------------------------------


def on_disk(message: Message) -> bool:
    """Whether the kept body is in a real file (a rolled-over spool, or any file on disk)."""
    body = message._body
    assert body is not None
    if isinstance(body, tempfile.SpooledTemporaryFile):
        return bool(body._rolled)  # type: ignore[attr-defined]
    try:
        body.fileno()
    except (OSError, io.UnsupportedOperation):
        return False
    return True


def test_body_not_kept_without_a_spool_threshold() -> None:
    message = make_message({}, None)
    message.append_body(b"abc")
    message.append_body(b"de")
    assert message.body_size == 5
    assert not message.body_kept
    with pytest.raises(LookupError, match="keep_message"):
        message.body()
    with pytest.raises(LookupError):
        message.body_bytes()


def test_context_without_spool_threshold_does_not_keep_bodies() -> None:
    ctx = make_ctx()
    assert not ctx.message.body_kept


def test_empty_kept_body() -> None:
    message = make_message({}, 100)
    assert message.body_kept
    assert message.body_size == 0
    assert message.body().read() == b""
    assert message.body_bytes() == b""


def test_small_body_stays_in_memory() -> None:
    message = make_message({}, 100)
    message.append_body(b"x" * 60)
    message.append_body(b"y" * 40)  # exactly the threshold: not above it
    assert message.body_size == 100
    assert not on_disk(message)
    assert message.body_bytes() == b"x" * 60 + b"y" * 40


def test_body_above_the_threshold_goes_to_disk() -> None:
    message = make_message({}, 100)
    message.append_body(b"x" * 60)
    message.append_body(b"y" * 60)
    assert on_disk(message)
    assert isinstance(message.body().fileno(), int)
    assert message.body_bytes() == b"x" * 60 + b"y" * 60
    message.close()
    assert message._body is None


def test_spool_threshold_zero_sends_every_body_to_disk() -> None:
    message = make_message({}, 0)
    message.append_body(b"x" * 100_000)
    assert on_disk(message)


def test_default_spool_threshold() -> None:
    assert DEFAULT_SPOOL_THRESHOLD == 1024 * 1024


def test_body_rewinds_on_every_call() -> None:
    message = make_message({}, 1000)
    message.append_body(b"first\r\n")
    assert message.body().read() == b"first\r\n"
    assert message.body().read() == b"first\r\n"
    message.append_body(b"second\r\n")  # appending after a read still appends at the end
    assert message.body_bytes() == b"first\r\nsecond\r\n"
    assert message.body_bytes() == b"first\r\nsecond\r\n"


@pytest.mark.parametrize("read", [0, 3], ids=["body-only", "partial-read"])
def test_append_after_body_appends_at_the_end(read: int) -> None:
    message = make_message({}, 1000)
    message.append_body(b"0123456789")
    message.body().read(read)
    message.append_body(b"abc")
    assert message.body_bytes() == b"0123456789abc"


# --- as_email -----------------------------------------------------------------------------


def utf8(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def test_as_email_headers_and_body() -> None:
    message = make_message({}, 1000)
    message.headers.extend(
        [
            Header(name="From", value="Alice <alice@example.org>"),
            Header(name="To", value="bob@example.net"),
            Header(name="Subject", value="a folded\n\tsubject line"),
            Header(name="X-Unicode", value=utf8("Gr\u00fc\u00dfe \u2603".encode())),
            Header(name="X-Latin1", value=utf8(b"caf\xe9")),
            Header(name="Content-Type", value="text/plain; charset=utf-8"),
        ]
    )
    message.append_body(b"Hello Bob,\r\n")
    message.append_body(b"bye.\r\n")
    parsed = message.as_email()
    assert parsed["From"] == "Alice <alice@example.org>"
    assert parsed["To"] == "bob@example.net"
    assert parsed["Subject"] == "a folded\tsubject line"
    assert parsed["X-Unicode"] == "Gr\u00fc\u00dfe \u2603"
    assert str(parsed["X-Latin1"]).startswith("caf")
    assert parsed.get_content_type() == "text/plain"
    assert parsed.get_content().replace("\r\n", "\n") == "Hello Bob,\nbye.\n"
    assert not parsed.defects


def test_as_email_with_a_body_on_disk() -> None:
    message = make_message({}, 10)
    message.headers.append(Header(name="Subject", value="big"))
    lines = [f"line {number}\r\n".encode() for number in range(1000)]
    for line in lines:
        message.append_body(line)
    assert on_disk(message)
    parsed = message.as_email()
    assert parsed["Subject"] == "big"
    # The email package works with LF line endings; the kept body keeps the MTA's CRLF.
    assert parsed.get_payload(decode=True) == b"".join(lines).replace(b"\r\n", b"\n")
    assert message.body_bytes() == b"".join(lines)  # as_email left the body readable


def test_as_email_without_a_kept_body_says_how_to_keep_it() -> None:
    # It used to give a message with the headers only, silently incomplete.
    message = make_message({}, None)
    message.headers.append(Header(name="Subject", value="no body"))
    message.append_body(b"not kept")
    with pytest.raises(NotAvailable, match=r"as_email\(\).*keep_message=True"):
        message.as_email()
    with pytest.raises(NotAvailable, match=r"body\(\).*keep_message=True"):
        message.body()
    with pytest.raises(NotAvailable, match="keep_message=True"):
        message.body_bytes()
    with pytest.raises(LookupError):  # what body() raised before: still caught the same way
        message.body()


def test_headers_not_asked_for_say_what_to_add() -> None:
    message = Message({}, 1000, headers_kept=False)
    message.header_records.append(Header(name="Subject", value="counted, not kept"))
    with pytest.raises(NotAvailable, match=r"'header' handler or .*keep_message=True"):
        _ = message.headers
    with pytest.raises(NotAvailable):
        message.as_email()


def test_as_email_of_an_empty_message() -> None:
    parsed = make_message({}, 1000).as_email()
    assert list(parsed.keys()) == []


class RecordingParser(email.parser.BytesFeedParser):
    fed: ClassVar[list[bytes]] = []

    def feed(self, data: bytes) -> None:
        RecordingParser.fed.append(data)
        super().feed(data)


@pytest.mark.parametrize(
    "header",
    [
        Header(name="Subject", value="Hi there"),
        Header(name="Subject", value=" Hi there", leading_space=True),
    ],
    ids=["stripped-by-mta", "leading-space"],
)
def test_as_email_reconstructs_header_lines_without_an_extra_space(
    header: Header, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(RecordingParser, "fed", [])
    monkeypatch.setattr(email.parser, "BytesFeedParser", RecordingParser)
    message = make_message({}, 0)
    message.headers.append(header)
    parsed = message.as_email()
    assert RecordingParser.fed[0] == b"Subject: Hi there\n"
    assert parsed["Subject"] == "Hi there"


def test_as_email_leading_space_keeps_a_tab() -> None:
    message = make_message({}, 1000)
    message.headers.append(Header(name="X-Tab", value="\tvalue", leading_space=True))
    message.headers.append(Header(name="X-None", value="value", leading_space=True))
    parsed = message.as_email()
    assert parsed["X-Tab"] == "value"
    assert parsed["X-None"] == "value"
