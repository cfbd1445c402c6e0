"""Tests of the MTA side: MtaConnection driven against the real milter-side MilterConnection.

Both halves run in memory: whatever one side's ``send`` returns is fed to the other side's
``receive_data``. Where a milter would have to misbehave, the milter-side machine refuses, so
those replies are crafted with ``codec.encode_response``.
"""

from __future__ import annotations

import ipaddress

import pytest

from milterapp.constants import ActionFlag, MacroStage, ProtocolFlag
from milterapp.errors import FrameTooLargeError, LocalProtocolError, RemoteProtocolError
from milterapp.events import (
    Abort,
    AddressFamily,
    Body,
    Connect,
    Data,
    EndOfHeaders,
    EndOfMessage,
    EnvFrom,
    EnvRcpt,
    Event,
    Header,
    Helo,
    Macros,
    Negotiate,
    Quit,
    QuitNoClose,
    Unknown,
)
from milterapp.protocol.codec import encode_command, encode_response
from milterapp.protocol.framing import encode_frame
from milterapp.protocol.machine import MilterConnection
from milterapp.protocol.mta import DEFAULT_OFFER, Answer, MtaConnection
from milterapp.protocol.negotiation import OPTIONAL_EVENTS, Requirements, negotiate
from milterapp.replies import (
    Accept,
    AddHeader,
    ChangeHeader,
    Continue,
    Discard,
    NegotiationReply,
    Progress,
    Reject,
    ReplaceBody,
    Reply,
    Shutdown,
    Skip,
    TempFail,
    Verdict,
)

CONNECT = Connect(
    hostname="mail.example.com",
    family=AddressFamily.INET,
    port=49974,
    address=ipaddress.IPv4Address("192.0.2.10"),
)
HELO = Helo(name="client.example.com")
MAIL = EnvFrom.from_raw("<alice@example.org>", ["SIZE=1024"])
RCPT = EnvRcpt(address="bob@example.net")
CONTINUED = Answer([], 0, Continue())


def handshake(
    needs: Requirements | None = None, offer: Negotiate = DEFAULT_OFFER
) -> tuple[MtaConnection, MilterConnection]:
    """Return both sides after negotiation, the milter asking for ``needs``."""
    mta, milter = MtaConnection(offer), MilterConnection()
    milter.receive_data(mta.send(offer))
    event = milter.next_event()
    assert isinstance(event, Negotiate)
    mta.receive_data(milter.send(negotiate(event, needs or Requirements())))
    assert mta.collect_answer() == Answer([], 0, None)
    return mta, milter


def deliver(mta: MtaConnection, milter: MilterConnection, event: Event) -> Event | None:
    """Send ``event`` from the MTA; return what the milter made of it."""
    milter.receive_data(mta.send(event))
    return milter.next_event()


def answer(mta: MtaConnection, milter: MilterConnection, *replies: Reply) -> Answer | None:
    """Send ``replies`` from the milter; return what the MTA collected."""
    mta.receive_data(b"".join(milter.send(reply) for reply in replies))
    return mta.collect_answer()


def exchange(
    mta: MtaConnection, milter: MilterConnection, event: Event, *replies: Reply
) -> Answer | None:
    assert deliver(mta, milter, event) == event
    return answer(mta, milter, *replies)


def open_message(mta: MtaConnection, milter: MilterConnection) -> None:
    for event in (CONNECT, HELO, MAIL):
        assert exchange(mta, milter, event, Continue()) == CONTINUED


def test_mta_full_session_against_milter() -> None:
    needs = Requirements(macros={MacroStage.ENVFROM: ("i", "{auth_authen}")})
    mta, milter = handshake(needs)
    assert mta.reply is not None
    assert mta.reply.macros == {MacroStage.ENVFROM: ("i", "{auth_authen}")}
    assert mta.options is not None
    assert mta.options.actions & ActionFlag.SETSYMLIST
    assert deliver(mta, milter, Macros(stage="C", values={"j": "mx.example.net"})) is not None
    assert not mta.awaiting_reply
    assert exchange(mta, milter, CONNECT, Continue()) == CONTINUED
    assert exchange(mta, milter, HELO, Continue()) == CONTINUED
    new_body = b"0123456789\r\n" * 12_500  # 150,000 bytes: three b packets
    for number in (1, 2):
        assert deliver(mta, milter, Macros(stage="M", values={"i": f"Q{number}"})) is not None
        assert exchange(mta, milter, MAIL, Continue()) == CONTINUED
        assert milter.macros["i"] == f"Q{number}"
        for event in (
            RCPT,
            Data(),
            Header(name="Subject", value="hello"),
            Header(name="From", value="alice@example.org"),
            EndOfHeaders(),
            Body(chunk=b"hello\r\n"),
        ):
            assert mta.expects_reply(event)
            assert exchange(mta, milter, event, Continue()) == CONTINUED
        assert deliver(mta, milter, EndOfMessage()) == EndOfMessage()
        assert mta.pending_command == "E"
        if number == 1:
            edits: list[Reply] = [
                AddHeader(name="X-Test", value="yes"),
                ChangeHeader(name="Subject", value="[tagged] hello"),
                ReplaceBody(chunk=new_body),
            ]
            got = answer(mta, milter, *edits, Accept())
            assert got is not None
            modifications, progress, verdict = got
            assert modifications[:2] == edits[:2]
            assert [type(m) for m in modifications[2:]] == [ReplaceBody] * 3
            assert b"".join(m.chunk for m in modifications[2:] if isinstance(m, ReplaceBody)) == (
                new_body
            )
            assert (progress, verdict) == (0, Accept())
        else:
            assert answer(mta, milter, Progress(), Progress(), Continue()) == Answer(
                [], 2, Continue()
            )
        assert not mta.awaiting_reply
        assert deliver(mta, milter, Abort()) is None  # Postfix's abort after each message
    assert deliver(mta, milter, Quit()) == Quit()
    assert not mta.awaiting_reply
    with pytest.raises(LocalProtocolError, match="QUIT was sent"):
        mta.send(Abort())


def test_mta_nr_hdr_means_no_reply_awaited() -> None:
    mta, milter = handshake(Requirements(no_reply=frozenset({"header"})))
    assert mta.options is not None
    assert mta.options.protocol & ProtocolFlag.NR_HDR
    assert not mta.expects_reply("L")
    assert not mta.expects_reply(Header)
    assert not mta.expects_reply(Header(name="X", value="y"))
    assert not mta.expects_reply(Macros)
    assert mta.expects_reply(b"R")
    assert mta.expects_reply(EndOfMessage())
    open_message(mta, milter)
    for event in (RCPT, Data()):
        assert exchange(mta, milter, event, Continue()) == CONTINUED
    first, second = Header(name="Subject", value="a"), Header(name="To", value="b")
    milter.receive_data(mta.send(first) + mta.send(second))
    assert not mta.awaiting_reply
    assert milter.next_event() == first
    assert not milter.awaiting_reply
    assert milter.next_event() == second
    assert exchange(mta, milter, EndOfHeaders(), Continue()) == CONTINUED


def test_mta_expects_reply_before_negotiation_uses_defaults() -> None:
    mta = MtaConnection()
    assert mta.expects_reply("O")
    assert mta.expects_reply("L")
    assert not mta.expects_reply(Abort())
    assert not mta.suppressed(Helo)
    with pytest.raises(ValueError, match="names no command"):
        mta.expects_reply("LL")


def test_mta_send_refuses_suppressed_command_unless_forced() -> None:
    mta, milter = handshake(Requirements(events=OPTIONAL_EVENTS - {"helo"}))
    assert exchange(mta, milter, CONNECT, Continue()) == CONTINUED
    assert mta.suppressed(Helo)
    assert mta.suppressed("H")
    assert not mta.suppressed(EnvFrom)
    with pytest.raises(LocalProtocolError, match="NOHELO"):
        mta.send(HELO)
    assert not mta.awaiting_reply
    data = mta.send(HELO, force=True)
    assert data == encode_command(HELO)
    assert not mta.awaiting_reply  # unhandled events are also made reply-less (NR_HELO)
    milter.receive_data(data)
    assert milter.next_event() == HELO
    assert not milter.awaiting_reply


def test_mta_suppressed_by_old_version() -> None:
    offer = Negotiate(version=2, actions=ActionFlag.V2, protocol=ProtocolFlag.V2)
    mta, _ = handshake(offer=offer)
    assert mta.options is not None
    assert mta.options.version == 2
    assert mta.suppressed(Unknown)
    with pytest.raises(LocalProtocolError, match="version 2"):
        mta.send(Unknown(line="XYZZY"))


def test_mta_send_checks_order_of_offer_and_replies() -> None:
    mta = MtaConnection()
    with pytest.raises(LocalProtocolError, match="offer"):
        mta.send(CONNECT)
    mta.send(DEFAULT_OFFER)
    assert mta.pending_command == "O"
    with pytest.raises(LocalProtocolError, match="still owed"):
        mta.send(CONNECT)
    mta.receive_data(encode_response(NegotiationReply(version=6)))
    assert mta.collect_answer() == Answer([], 0, None)
    with pytest.raises(LocalProtocolError, match="once per connection"):
        mta.send(DEFAULT_OFFER)
    mta.send(CONNECT)
    with pytest.raises(LocalProtocolError, match="still owed"):
        mta.send(HELO)
    mta.send(Macros(stage="H"), force=True)  # force skips every check
    assert mta.pending_command == "C"


def test_mta_forced_commands_queue_owed_replies() -> None:
    mta, milter = handshake()
    milter.receive_data(mta.send(CONNECT) + mta.send(HELO, force=True))
    assert milter.next_event() == CONNECT
    assert answer(mta, milter, Continue()) == CONTINUED
    assert mta.pending_command == "H"
    assert milter.next_event() == HELO
    assert answer(mta, milter, Continue()) == CONTINUED
    assert not mta.awaiting_reply


def test_mta_reply_when_none_owed_is_remote_error() -> None:
    mta, milter = handshake()
    assert exchange(mta, milter, CONNECT, Continue()) == CONTINUED
    mta.receive_data(encode_response(Continue()))
    with pytest.raises(RemoteProtocolError, match="no reply is owed"):
        mta.next_reply()
    with pytest.raises(RemoteProtocolError, match="already failed"):
        mta.next_reply()


@pytest.mark.parametrize("reply", [AddHeader(name="X-Test", value="1"), Progress()])
def test_mta_modification_in_answer_to_rcpt_is_remote_error(reply: Reply) -> None:
    mta, milter = handshake()
    open_message(mta, milter)
    assert deliver(mta, milter, RCPT) == RCPT
    mta.receive_data(encode_response(reply))
    with pytest.raises(RemoteProtocolError, match="only allowed while end of message"):
        mta.next_reply()


@pytest.mark.parametrize(
    ("offer", "reply", "message"),
    [
        (
            Negotiate(version=6, actions=ActionFlag.ADDHDRS, protocol=ProtocolFlag.ALL),
            NegotiationReply(version=6, actions=ActionFlag.ADDHDRS | ActionFlag.CHGBODY),
            "actions not offered: CHGBODY",
        ),
        (
            Negotiate(version=6, actions=ActionFlag.ALL, protocol=ProtocolFlag.V2),
            NegotiationReply(version=6, protocol=ProtocolFlag.SKIP),
            "protocol flags not offered: SKIP",
        ),
        (
            Negotiate(version=4, actions=ActionFlag.ALL, protocol=ProtocolFlag.ALL),
            NegotiationReply(version=6),
            "version 6",
        ),
        (  # bits the protocol does not name: an IntFlag's complement would hide them
            Negotiate(version=6, actions=ActionFlag.ALL, protocol=ProtocolFlag.ALL),
            NegotiationReply(version=6, actions=ActionFlag(0x3FF)),
            "actions not offered: 0x200",
        ),
        (
            Negotiate(version=6, actions=ActionFlag.ALL, protocol=ProtocolFlag.ALL),
            NegotiationReply(version=6, protocol=ProtocolFlag(0x400000)),
            "protocol flags not offered: 0x400000",
        ),
    ],
)
def test_mta_negotiation_reply_beyond_offer_is_remote_error(
    offer: Negotiate, reply: NegotiationReply, message: str
) -> None:
    mta = MtaConnection(offer)
    mta.send(offer)
    mta.receive_data(encode_response(reply))
    with pytest.raises(RemoteProtocolError, match=message) as caught:
        mta.next_reply()
    assert caught.value.command == "O"
    assert mta.options is None


def test_mta_negotiation_reply_only_answers_the_offer() -> None:
    mta = MtaConnection()
    mta.send(DEFAULT_OFFER)
    mta.receive_data(encode_response(Continue()))
    with pytest.raises(RemoteProtocolError, match="expected the negotiation reply"):
        mta.next_reply()
    mta, _ = handshake()
    mta.send(CONNECT)
    mta.receive_data(encode_response(NegotiationReply()))
    with pytest.raises(RemoteProtocolError, match="negotiation reply in answer to 'C'"):
        mta.next_reply()


def test_mta_reply_fed_one_byte_at_a_time() -> None:
    mta, milter = handshake()
    open_message(mta, milter)
    assert deliver(mta, milter, EndOfMessage()) == EndOfMessage()
    data = milter.send(AddHeader(name="X-Test", value="yes")) + milter.send(Accept())
    for i in range(len(data) - 1):
        mta.receive_data(data[i : i + 1])
        assert mta.collect_answer() is None
    mta.receive_data(data[-1:])
    assert mta.collect_answer() == Answer([AddHeader(name="X-Test", value="yes")], 0, Accept())


def test_mta_reject_at_rcpt_keeps_message_going() -> None:
    mta, milter = handshake()
    open_message(mta, milter)
    refusal = Reject(code=550, xcode="5.1.1", text="no such user")
    assert exchange(mta, milter, RCPT, refusal) == Answer([], 0, refusal)
    other = EnvRcpt(address="carol@example.net")
    assert exchange(mta, milter, other, Continue()) == CONTINUED
    assert exchange(mta, milter, Data(), Continue()) == CONTINUED


@pytest.mark.parametrize("verdict", [Accept(), Discard()])
def test_mta_accept_or_discard_at_rcpt_ends_message(verdict: Verdict) -> None:
    mta, milter = handshake()
    open_message(mta, milter)
    assert exchange(mta, milter, RCPT, verdict) == Answer([], 0, verdict)
    with pytest.raises(LocalProtocolError, match="already has its verdict"):
        mta.send(Data())


def test_mta_accept_at_mail_ends_message() -> None:
    mta, milter = handshake()
    for event in (CONNECT, HELO):
        assert exchange(mta, milter, event, Continue()) == CONTINUED
    assert exchange(mta, milter, MAIL, Accept()) == Answer([], 0, Accept())
    with pytest.raises(LocalProtocolError, match="send MAIL or ABORT first"):
        mta.send(RCPT)
    with pytest.raises(LocalProtocolError, match="send MAIL or ABORT first"):
        mta.send(EndOfMessage())
    assert deliver(mta, milter, Macros(stage="R")) is not None
    assert exchange(mta, milter, MAIL, Continue()) == CONTINUED
    assert exchange(mta, milter, RCPT, Continue()) == CONTINUED


def test_mta_abort_allows_next_message() -> None:
    mta, milter = handshake()
    open_message(mta, milter)
    assert exchange(mta, milter, RCPT, Continue()) == CONTINUED
    assert exchange(mta, milter, Data(), Reject()) == Answer([], 0, Reject())
    with pytest.raises(LocalProtocolError, match="already has its verdict"):
        mta.send(Header(name="Subject", value="x"))
    assert deliver(mta, milter, Abort()) is None
    mta.send(RCPT)  # the MTA side does not check order beyond the verdicts
    assert mta.pending_command == "R"


@pytest.mark.parametrize("verdict", [Reject(), Accept(), Reject(code=554, text="go away")])
def test_mta_connection_verdict_allows_only_abort_macros_quit(verdict: Verdict) -> None:
    mta, milter = handshake()
    assert exchange(mta, milter, CONNECT, verdict) == Answer([], 0, verdict)
    for event in (HELO, MAIL, RCPT, Unknown(line="NOOP"), EndOfMessage()):
        with pytest.raises(LocalProtocolError, match="connection-level verdict"):
            mta.send(event)
    assert deliver(mta, milter, Macros(stage="H", values={"x": "1"})) is not None
    assert deliver(mta, milter, Abort()) is None
    assert deliver(mta, milter, Quit()) == Quit()
    assert not mta.awaiting_reply


def test_mta_shutdown_at_mail_ends_connection() -> None:
    mta, milter = handshake()
    for event in (CONNECT, HELO):
        assert exchange(mta, milter, event, Continue()) == CONTINUED
    assert exchange(mta, milter, MAIL, Shutdown()) == Answer([], 0, Shutdown())
    with pytest.raises(LocalProtocolError, match="connection-level verdict"):
        mta.send(MAIL)


def test_mta_quit_no_close_starts_a_new_session() -> None:
    mta, milter = handshake()
    assert exchange(mta, milter, CONNECT, TempFail()) == Answer([], 0, TempFail())
    assert deliver(mta, milter, QuitNoClose()) == QuitNoClose()
    assert exchange(mta, milter, CONNECT, Continue()) == CONTINUED


def test_mta_skip_after_body_chunk_ends_body() -> None:
    mta, milter = handshake()
    open_message(mta, milter)
    for event in (RCPT, Data(), EndOfHeaders()):
        assert exchange(mta, milter, event, Continue()) == CONTINUED
    assert exchange(mta, milter, Body(chunk=b"a\r\n"), Skip()) == Answer([], 0, Skip())
    with pytest.raises(LocalProtocolError, match="Skip"):
        mta.send(Body(chunk=b"b\r\n"))
    assert exchange(mta, milter, EndOfMessage(), Continue()) == CONTINUED


@pytest.mark.parametrize(
    ("needs", "command", "message"),
    [
        (Requirements(), Header(name="Subject", value="x"), "not a valid answer to 'L'"),
        (Requirements(skip=False), Body(chunk=b"x"), "without the SKIP protocol flag"),
    ],
)
def test_mta_skip_only_after_body_chunk_with_skip(
    needs: Requirements, command: Event, message: str
) -> None:
    mta, milter = handshake(needs)
    open_message(mta, milter)
    for event in (RCPT, Data()):
        assert exchange(mta, milter, event, Continue()) == CONTINUED
    if isinstance(command, Body):
        assert exchange(mta, milter, EndOfHeaders(), Continue()) == CONTINUED
    assert deliver(mta, milter, command) == command
    mta.receive_data(encode_response(Skip()))
    with pytest.raises(RemoteProtocolError, match=message):
        mta.next_reply()


def test_mta_discard_at_connect_is_remote_error() -> None:
    mta, milter = handshake()
    assert deliver(mta, milter, CONNECT) == CONNECT
    mta.receive_data(encode_response(Discard()))
    with pytest.raises(RemoteProtocolError, match="Discard is not a valid answer to 'C'"):
        mta.next_reply()


def test_mta_end_of_file() -> None:
    mta, _ = handshake()
    mta.receive_data(b"")
    assert mta.next_reply() is None  # nothing owed: a clean close
    mta, _ = handshake()
    mta.send(CONNECT)
    mta.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="closed the connection while a reply"):
        mta.next_reply()
    mta, _ = handshake()
    mta.send(CONNECT)
    mta.receive_data(encode_response(Continue())[:3])
    mta.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="middle of a packet"):
        mta.next_reply()


def test_mta_packet_limits() -> None:
    mta, milter = handshake()
    open_message(mta, milter)
    with pytest.raises(LocalProtocolError, match="exceeds 65535"):
        mta.send(Body(chunk=b"x" * 65536))
    mta.send(Body(chunk=b"x" * 65535))
    big = ReplaceBody(chunk=b"x" * 2_000_000)  # one packet: the MTA side reads big packets
    mta.receive_data(encode_response(Continue()))
    assert mta.collect_answer() == CONTINUED
    mta.send(EndOfMessage())
    mta.receive_data(encode_response(big, max_data_size=2_000_000) + encode_response(Accept()))
    assert mta.collect_answer() == Answer([big], 0, Accept())
    small = MtaConnection(max_data_size=10)
    small.send(DEFAULT_OFFER)
    small.receive_data(encode_frame(b"O", b"x" * 11))
    with pytest.raises(FrameTooLargeError):
        small.next_reply()


def test_mta_sends_a_pipelined_batch_and_takes_its_answers_in_order() -> None:
    needs = Requirements(events=frozenset({"connect", "helo", "envfrom", "header", "eoh"}))
    mta, milter = handshake(needs)
    open_message(mta, milter)
    data, owed = mta.send_packets(
        [(b"D", b"Li\x00Q1\x00"), (b"L", b"Subject\x00hi\x00"), (b"L", b"To\x00b\x00"), (b"N", b"")]
    )
    assert owed == 3  # two headers and end of headers; the macro packet owes nothing
    assert mta.pending_command == "L"
    milter.receive_data(data)
    received = []
    while (event := milter.next_event()) is not None:
        if not isinstance(event, Macros):
            received.append(event)
            mta.receive_data(milter.send(Continue()))
    assert received == [
        Header(name="Subject", value="hi"),
        Header(name="To", value="b"),
        EndOfHeaders(),
    ]
    assert [mta.next_reply() for _ in range(3)] == [Continue()] * 3
    assert not mta.awaiting_reply


def test_mta_batch_is_refused_whole_when_one_command_may_not_be_sent() -> None:
    needs = Requirements(events=frozenset({"connect", "helo", "envfrom", "eoh", "body"}))
    mta, milter = handshake(needs)
    open_message(mta, milter)
    with pytest.raises(LocalProtocolError, match="Header refused"):  # declined
        mta.send_packets([(b"N", b""), (b"L", b"Subject\x00hi\x00")])
    with pytest.raises(LocalProtocolError, match="exceeds 65535"):
        mta.send_packets([(b"B", b"x"), (b"B", b"x" * 65536)])
    with pytest.raises(LocalProtocolError, match="Negotiate refused"):
        mta.send_packet(b"O", b"")
    assert not mta.awaiting_reply  # nothing was sent
