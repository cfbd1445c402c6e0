"""MilterConnection, the milter-side state machine, driven with MTA bytes from the codec.

Protocol reference: §3 (commands, NR flags, macros), §4 (responses and when they are legal),
§7 (session order and the verdict table).
"""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from milterapp.constants import ActionFlag, ConnectionState, ProtocolFlag
from milterapp.errors import (
    ActionNotNegotiated,
    FrameTooLargeError,
    LocalProtocolError,
    RemoteProtocolError,
)
from milterapp.events import (
    Abort,
    AddressFamily,
    Body,
    Connect,
    ConnectionClosed,
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
from milterapp.protocol.codec import encode_command
from milterapp.protocol.machine import UNPARSED, MilterConnection
from milterapp.protocol.negotiation import Requirements, negotiate
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
    NegotiationReply,
    Progress,
    Quarantine,
    Reject,
    ReplaceBody,
    Reply,
    Shutdown,
    Skip,
    TempFail,
)
from tests.protocol.helpers import (
    POSTFIX_OFFER,
    decode_responses,
    drive,
    negotiated_connection,
    postfix_session,
    wire,
)

CONNECT = Connect(
    hostname="mail.example.com",
    family=AddressFamily.INET,
    port=49974,
    address=ipaddress.IPv4Address("198.51.100.7"),
)
HELO = Helo(name="mail.example.com")
MAIL = EnvFrom(address="alice@example.org", args=["SIZE=1024"])
RCPT = EnvRcpt(address="bob@example.net")
DATA = Data()
HEADER = Header(name="Subject", value="hello")
EOH = EndOfHeaders()
BODY = Body(chunk=b"Hello Bob.\r\n")
EOM = EndOfMessage()

#: Events of one message in protocol order, and its commands by letter.
MESSAGE: tuple[Event, ...] = (MAIL, RCPT, DATA, HEADER, EOH, BODY, EOM)
BY_LETTER: dict[str, Event] = {
    "C": CONNECT,
    "H": HELO,
    "M": MAIL,
    "R": RCPT,
    "T": DATA,
    "L": HEADER,
    "N": EOH,
    "B": BODY,
    "E": EOM,
    "U": Unknown(line="XCLIENT NAME=x"),
    "A": Abort(),
    "Q": Quit(),
    "K": QuitNoClose(),
    "D": Macros(stage="M", values={"i": "4Xy1Zk0Q1Bz9sTn"}),
    "O": POSTFIX_OFFER,
}


def connected(
    needs: Requirements | None = None, offer: Negotiate = POSTFIX_OFFER
) -> MilterConnection:
    """Return a connection past CONNECT and HELO."""
    conn = negotiated_connection(needs, offer)
    drive(conn, wire(CONNECT, HELO))
    assert conn.state is ConnectionState.SESSION
    return conn


def waiting_for(letters: str, needs: Requirements | None = None) -> MilterConnection:
    """Return a connection whose last command (``letters[-1]``) waits for a reply.

    ``letters`` are message commands; every one but the last is answered with Continue.
    """
    conn = connected(needs)
    if letters[:-1]:
        drive(conn, wire(*(BY_LETTER[c] for c in letters[:-1])))
    conn.receive_data(encode_command(BY_LETTER[letters[-1]]))
    assert conn.next_event() == BY_LETTER[letters[-1]]
    assert conn.pending_command == letters[-1]
    return conn


def waiting_at_connection_level(letter: str) -> MilterConnection:
    """Return a connection whose CONNECT (``"C"``) or HELO (``"H"``) waits for a reply."""
    conn = negotiated_connection()
    if letter == "H":
        drive(conn, wire(CONNECT))
    conn.receive_data(encode_command(BY_LETTER[letter]))
    assert conn.next_event() == BY_LETTER[letter]
    assert conn.pending_command == letter
    return conn


def expected_events(session: list[Event]) -> list[Event]:
    """Return what the machine hands out for ``session``: all but the aborts with no message."""
    out = []
    in_message = False
    for event in session:
        if isinstance(event, EnvFrom):
            in_message = True
        elif isinstance(event, EndOfMessage | Quit):
            in_message = False
        elif isinstance(event, Abort):
            if not in_message:
                continue
            in_message = False
        out.append(event)
    return out


# --- a whole Postfix session -----------------------------------------------------------------


def test_machine_postfix_session_events_and_replies() -> None:
    session = postfix_session()
    conn = MilterConnection()
    pending: list[str | None] = []

    def answer(event: Event) -> Reply:
        pending.append(conn.pending_command)
        if isinstance(event, Negotiate):
            return negotiate(event, Requirements())
        return Continue()

    sent: list[tuple[Reply, bytes]] = []
    events = drive(conn, wire(*session), answer, sent=sent)

    assert events == expected_events(session)
    assert len(events) == len(session) - 2  # the A after each complete message is swallowed
    assert sum(isinstance(e, Abort) for e in events) == 1  # the RSET in the middle
    assert isinstance(events[-1], Quit)
    # Exactly one reply for each command that needs one (§3); none for D, A and Q.
    needing = [e for e in events if e.command in (b"O", *(c.encode() for c in "CHMRTLNBE"))]
    assert pending == [e.command.decode() for e in needing]
    assert [reply for reply, _ in sent[1:]] == [Continue()] * (len(needing) - 1)
    for reply, out in sent:
        assert decode_responses(out) == [reply]
    assert conn.state is ConnectionState.CLOSED
    assert len(conn.macros) == 0  # Q clears every table
    assert conn.next_event() is None


def test_machine_postfix_session_macros_per_stage() -> None:
    conn = MilterConnection()
    seen: dict[str, dict[str, str]] = {}

    def answer(event: Event) -> Reply:
        if isinstance(event, Negotiate):
            return negotiate(event, Requirements())
        seen.setdefault(type(event).__name__, dict(conn.macros))
        return Continue()

    drive(conn, wire(*postfix_session()), answer)

    assert seen["Connect"]["daemon_name"] == "smtpd"
    assert seen["Connect"]["_"] == "mail.example.com [198.51.100.7]"
    assert seen["EnvFrom"]["mail_addr"] == "alice1@example.org"
    assert "i" not in seen["EnvFrom"]
    assert seen["EnvFrom"]["j"] == "mx.example.net"  # CONNECT macros stay visible
    assert seen["EnvRcpt"]["rcpt_addr"] == "bob1@example.net"
    assert seen["Header"]["i"] == "4Xy1Zk0Q1Bz9sTn"
    assert seen["EndOfMessage"]["mail_addr"] == "alice1@example.org"


def test_machine_postfix_session_one_byte_at_a_time() -> None:
    session = postfix_session()
    data = wire(*session)
    conn = MilterConnection()

    events: list[Event] = []
    for i in range(len(data)):
        events += drive(conn, data[i : i + 1])

    assert events == expected_events(session)
    assert conn.state is ConnectionState.CLOSED


SESSION = postfix_session()
SESSION_WIRE = wire(*SESSION)
SESSION_EVENTS = expected_events(SESSION)


@settings(max_examples=40)
@given(sizes=st.lists(st.integers(min_value=1, max_value=300), min_size=1, max_size=20))
def test_machine_postfix_session_any_split(sizes: list[int]) -> None:
    conn = MilterConnection()

    events: list[Event] = []
    pos = 0
    turn = 0
    while pos < len(SESSION_WIRE):
        size = sizes[turn % len(sizes)]
        # Past the first pieces, let the rest arrive in larger reads to keep this fast.
        if turn >= 500:
            size *= 64
        events += drive(conn, SESSION_WIRE[pos : pos + size])
        pos += size
        turn += 1

    assert events == SESSION_EVENTS


def test_machine_postfix_session_then_eof() -> None:
    conn = MilterConnection()

    events = drive(conn, wire(*postfix_session()[:-1]))
    events += drive(conn, b"")

    assert isinstance(events[-1], ConnectionClosed)
    assert conn.state is ConnectionState.CLOSED


# --- holding events back while a reply is owed -----------------------------------------------


def test_machine_no_event_while_reply_pending() -> None:
    conn = MilterConnection()
    conn.receive_data(wire(POSTFIX_OFFER, Macros(stage="C", values={"j": "mx"}), CONNECT, HELO))

    assert conn.next_event() == POSTFIX_OFFER
    assert conn.awaiting_reply
    assert conn.pending_command == "O"
    assert conn.next_event() is None
    assert conn.next_event() is None
    assert conn.state is ConnectionState.NEGOTIATING

    conn.send(negotiate(POSTFIX_OFFER, Requirements()))
    assert not conn.awaiting_reply
    assert conn.pending_command is None
    assert conn.next_event() == Macros(stage="C", values={"j": "mx"})
    assert not conn.awaiting_reply
    assert conn.next_event() == CONNECT
    assert conn.pending_command == "C"
    assert conn.next_event() is None

    conn.send(Continue())
    assert conn.next_event() == HELO
    assert conn.pending_command == "H"
    conn.send(Continue())
    assert conn.next_event() is None
    assert not conn.awaiting_reply


def test_machine_send_with_nothing_pending() -> None:
    with pytest.raises(LocalProtocolError, match="no command waits"):
        MilterConnection().send(Continue())

    conn = connected()
    with pytest.raises(LocalProtocolError, match="no command waits"):
        conn.send(Continue())
    with pytest.raises(LocalProtocolError, match="no command waits"):
        conn.send(AddHeader(name="X-A", value="b"))
    assert conn.state is ConnectionState.SESSION


def test_machine_no_reply_flag_for_headers() -> None:
    conn = connected(Requirements(no_reply=frozenset({"header"})))
    drive(conn, wire(MAIL, RCPT, DATA))
    headers = [Header(name=f"X-{i}", value=str(i)) for i in range(3)]
    conn.receive_data(wire(*headers, EOH))

    for header in headers:
        assert conn.next_event() == header
        assert not conn.awaiting_reply
        with pytest.raises(LocalProtocolError, match="no command waits"):
            conn.send(Continue())
    assert conn.next_event() == EOH
    assert conn.pending_command == "N"


def test_machine_unknown_command_needs_reply_and_changes_nothing() -> None:
    conn = connected()
    drive(conn, wire(MAIL))
    unknown = BY_LETTER["U"]
    conn.receive_data(encode_command(unknown))

    assert conn.next_event() == unknown
    assert conn.pending_command == "U"
    conn.send(Reject())
    assert conn.state is ConnectionState.MESSAGE
    assert drive(conn, wire(RCPT)) == [RCPT]


# --- modifications ---------------------------------------------------------------------------

MODIFICATIONS: list[Reply] = [
    AddHeader(name="X-Spam-Flag", value="YES"),
    InsertHeader(index=0, name="X-First", value="1"),
    ChangeHeader(index=2, name="Subject", value=""),
    AddRecipient(address="<carol@example.net>"),
    AddRecipient(address="<dave@example.net>", args="NOTIFY=NEVER"),
    DeleteRecipient(address="<bob@example.net>"),
    ChangeSender(address="<bounce@example.org>", args="RET=HDRS"),
    Quarantine(reason="looks odd"),
    ReplaceBody(chunk=b"new body\r\n"),
]


def test_machine_modifications_during_eom() -> None:
    conn = waiting_for("MRTLNBE")

    for modification in MODIFICATIONS:
        out = conn.send(modification)
        assert decode_responses(out) == [modification]
        assert conn.awaiting_reply
        assert conn.pending_command == "E"
    conn.send(Progress())
    assert conn.awaiting_reply
    assert decode_responses(conn.send(Accept())) == [Accept()]
    assert not conn.awaiting_reply
    assert conn.state is ConnectionState.SESSION


@pytest.mark.parametrize("letters", ["M", "MR", "MRT", "MRTL", "MRTLN", "MRTLNB"])
@pytest.mark.parametrize(
    "modification", [*MODIFICATIONS, Progress()], ids=lambda r: type(r).__name__
)
def test_machine_modification_outside_eom_refused(letters: str, modification: Reply) -> None:
    conn = waiting_for(letters)

    with pytest.raises(LocalProtocolError, match="only allowed during end of message"):
        conn.send(modification)

    assert conn.state is ConnectionState.MESSAGE
    assert conn.pending_command == letters[-1]
    assert decode_responses(conn.send(Continue())) == [Continue()]
    assert not conn.awaiting_reply


def test_machine_modification_at_connect_refused() -> None:
    conn = negotiated_connection()
    conn.receive_data(encode_command(CONNECT))
    conn.next_event()

    with pytest.raises(LocalProtocolError, match="end of message"):
        conn.send(AddHeader(name="X-A", value="b"))

    assert conn.state is ConnectionState.SESSION
    conn.send(Continue())


@pytest.mark.parametrize(
    ("modification", "action"),
    [
        (ChangeSender(address="<x@example.org>"), "CHGFROM"),
        (AddRecipient(address="<x@example.org>"), "ADDRCPT"),
        (AddRecipient(address="<x@example.org>", args="NOTIFY=NEVER"), "ADDRCPT_PAR"),
        (DeleteRecipient(address="<x@example.org>"), "DELRCPT"),
        (ChangeHeader(name="Subject", value="x"), "CHGHDRS"),
        (ReplaceBody(chunk=b"x"), "CHGBODY"),
        (Quarantine(reason="x"), "QUARANTINE"),
    ],
    ids=lambda value: value if isinstance(value, str) else type(value).__name__,
)
def test_machine_modification_not_negotiated(modification: Reply, action: str) -> None:
    conn = waiting_for("MRE", Requirements(actions=ActionFlag.ADDHDRS))

    with pytest.raises(ActionNotNegotiated, match=action) as info:
        conn.send(modification)

    assert info.value.action == action
    assert conn.pending_command == "E"
    conn.send(AddHeader(name="X-A", value="b"))
    conn.send(InsertHeader(index=1, name="X-B", value="c"))
    conn.send(Continue())
    assert conn.state is ConnectionState.SESSION


def test_machine_progress_does_not_end_eom() -> None:
    conn = waiting_for("ME")

    for _ in range(3):
        assert decode_responses(conn.send(Progress())) == [Progress()]
        assert conn.pending_command == "E"
        assert conn.state is ConnectionState.MESSAGE
    conn.send(Reject(code=550, xcode="5.7.1", text="no"))
    assert conn.state is ConnectionState.SESSION


def test_machine_replace_body_split_in_packets() -> None:
    conn = waiting_for("MRE")
    body = (bytes(range(256)) * 586)[:150_000]

    out = conn.send(ReplaceBody(chunk=body))

    packets = decode_responses(out)
    assert len(packets) == 3
    assert all(isinstance(p, ReplaceBody) for p in packets)
    chunks = [p.chunk for p in packets if isinstance(p, ReplaceBody)]
    assert [len(c) for c in chunks] == [65535, 65535, 150_000 - 2 * 65535]
    assert b"".join(chunks) == body


def test_machine_replace_body_uses_negotiated_size() -> None:
    offer = Negotiate(
        version=6, actions=ActionFlag.ALL, protocol=ProtocolFlag.ALL | ProtocolFlag.MDS_256K
    )
    conn = negotiated_connection(Requirements(max_data_size=262143), offer)
    drive(conn, wire(CONNECT, MAIL, RCPT))
    conn.receive_data(encode_command(EOM))
    conn.next_event()

    packets = decode_responses(conn.send(ReplaceBody(chunk=b"y" * 150_000)))

    assert packets == [ReplaceBody(chunk=b"y" * 150_000)]


def test_machine_replace_body_packets_consecutive() -> None:
    conn = waiting_for("MRE")
    conn.send(AddHeader(name="X-Before", value="ok"))  # edits before the body are fine
    conn.send(ReplaceBody(chunk=b"part 1\r\n"))
    conn.send(ReplaceBody(chunk=b"part 2\r\n"))
    conn.send(AddHeader(name="X-After", value="ok"))

    with pytest.raises(LocalProtocolError, match="ReplaceBody"):
        conn.send(ReplaceBody(chunk=b"part 3\r\n"))

    assert conn.pending_command == "E"
    conn.send(Continue())
    # The next message starts afresh.
    drive(conn, wire(MAIL, RCPT))
    conn.receive_data(encode_command(EOM))
    conn.next_event()
    conn.send(ReplaceBody(chunk=b"a"))
    conn.send(ReplaceBody(chunk=b"b"))


def test_machine_progress_between_replace_body_refused() -> None:
    conn = waiting_for("MRE")
    conn.send(ReplaceBody(chunk=b"part 1\r\n"))
    conn.send(Progress())

    with pytest.raises(LocalProtocolError, match="ReplaceBody"):
        conn.send(ReplaceBody(chunk=b"part 2\r\n"))


# --- which replies are legal where -----------------------------------------------------------


@pytest.mark.parametrize("letter", ["C", "H"])
def test_machine_discard_at_connection_level_refused(letter: str) -> None:
    conn = waiting_at_connection_level(letter)

    with pytest.raises(LocalProtocolError, match="Discard is not a valid answer"):
        conn.send(Discard())

    assert conn.pending_command == letter
    conn.send(Continue())
    assert conn.state is ConnectionState.SESSION


def test_machine_discard_for_unknown_refused() -> None:
    conn = connected()
    conn.receive_data(encode_command(BY_LETTER["U"]))
    conn.next_event()

    with pytest.raises(LocalProtocolError, match="Discard"):
        conn.send(Discard())


def test_machine_skip_after_body_chunk() -> None:
    conn = waiting_for("MRTLNB")

    assert decode_responses(conn.send(Skip())) == [Skip()]

    assert conn.state is ConnectionState.MESSAGE
    assert conn.skipped
    assert drive(conn, wire(EOM)) == [EOM]
    assert conn.state is ConnectionState.SESSION


def test_machine_body_chunk_after_skip_is_remote_error() -> None:
    conn = waiting_for("MRTLNB")
    conn.send(Skip())
    conn.receive_data(encode_command(BODY))

    with pytest.raises(RemoteProtocolError, match="after Skip") as info:
        conn.next_event()

    assert info.value.command == "B"
    assert conn.state is ConnectionState.ERROR


def test_machine_skip_flag_reset_by_next_message() -> None:
    conn = waiting_for("MRB")
    conn.send(Skip())
    drive(conn, wire(EOM))

    assert drive(conn, wire(MAIL, RCPT, BODY, BODY, EOM)) == [MAIL, RCPT, BODY, BODY, EOM]


def test_machine_skip_without_skip_negotiated() -> None:
    conn = waiting_for("MRB", Requirements(skip=False))

    with pytest.raises(LocalProtocolError, match="SKIP"):
        conn.send(Skip())

    assert conn.pending_command == "B"
    conn.send(Continue())


@pytest.mark.parametrize("letters", ["M", "MR", "MRT", "MRTL", "MRTLN", "MRTLNBE"])
def test_machine_skip_outside_body_refused(letters: str) -> None:
    conn = waiting_for(letters)

    with pytest.raises(LocalProtocolError, match="Skip is not a valid answer"):
        conn.send(Skip())

    assert conn.pending_command == letters[-1]


def test_machine_negotiation_reply_outside_negotiation_refused() -> None:
    conn = waiting_for("M")

    with pytest.raises(LocalProtocolError, match="negotiation reply"):
        conn.send(NegotiationReply())

    assert conn.pending_command == "M"


def test_machine_invalid_negotiation_reply_changes_nothing() -> None:
    conn = MilterConnection()
    conn.receive_data(encode_command(Negotiate(version=2, actions=ActionFlag.V2, protocol=0)))
    conn.next_event()

    with pytest.raises(LocalProtocolError, match="version 6"):
        conn.send(NegotiationReply(version=6))

    assert conn.state is ConnectionState.NEGOTIATING
    assert conn.pending_command == "O"
    conn.send(NegotiationReply(version=2))
    assert conn.state is ConnectionState.CONNECTING


@pytest.mark.parametrize("reply", [Continue(), Progress(), AddHeader(name="X-A", value="b")])
def test_machine_other_reply_to_negotiation_refused(reply: Reply) -> None:
    conn = MilterConnection()
    conn.receive_data(encode_command(POSTFIX_OFFER))
    conn.next_event()

    with pytest.raises(LocalProtocolError):
        conn.send(reply)

    assert conn.pending_command == "O"


# --- what verdicts do (§7 table) -------------------------------------------------------------


@pytest.mark.parametrize(
    "verdict", [Reject(), TempFail(), Reject(code=550, text="no such user")], ids=repr
)
def test_machine_refused_recipient_keeps_message(verdict: Reply) -> None:
    conn = waiting_for("MR")

    conn.send(verdict)

    assert conn.state is ConnectionState.MESSAGE
    second = EnvRcpt(address="carol@example.net")
    assert drive(conn, wire(second, DATA, EOM)) == [second, DATA, EOM]
    assert conn.state is ConnectionState.SESSION


@pytest.mark.parametrize("letters", ["M", "MR"])
@pytest.mark.parametrize("verdict", [Accept(), Discard()], ids=repr)
def test_machine_accept_or_discard_ends_message(letters: str, verdict: Reply) -> None:
    conn = waiting_for(letters)

    conn.send(verdict)

    assert conn.state is ConnectionState.SESSION
    conn.receive_data(encode_command(DATA))
    with pytest.raises(RemoteProtocolError, match="outside a message") as info:
        conn.next_event()
    assert info.value.command == "T"


@pytest.mark.parametrize("letters", ["M", "MRT", "MRTL", "MRTLN", "MRTLNB", "MRTLNBE"])
@pytest.mark.parametrize(
    "verdict", [Accept(), Reject(), TempFail(), Discard(), TempFail(code=421)], ids=repr
)
def test_machine_message_verdict_ends_message(letters: str, verdict: Reply) -> None:
    conn = waiting_for(letters)

    conn.send(verdict)

    assert conn.state is ConnectionState.SESSION
    # Postfix's abort after the message is swallowed; the next message opens with MAIL.
    assert drive(conn, wire(Abort(), MAIL, RCPT, EOM)) == [MAIL, RCPT, EOM]


def test_machine_continue_at_eom_ends_message() -> None:
    conn = waiting_for("MRTLNBE")

    conn.send(Continue())

    assert conn.state is ConnectionState.SESSION
    assert drive(conn, wire(MAIL)) == [MAIL]
    assert conn.state is ConnectionState.MESSAGE
    assert conn.rank == 2  # MAIL's place in CHMRTLNBE


@pytest.mark.parametrize("letter", ["C", "H"])
@pytest.mark.parametrize(
    "verdict",
    [Reject(), TempFail(), Accept(), Shutdown(), Reject(code=554, text="go away")],
    ids=repr,
)
def test_machine_connection_level_verdict(letter: str, verdict: Reply) -> None:
    conn = waiting_at_connection_level(letter)

    conn.send(verdict)

    assert conn.state is ConnectionState.DONE
    conn.receive_data(encode_command(MAIL))
    with pytest.raises(RemoteProtocolError, match="connection-level verdict") as info:
        conn.next_event()
    assert info.value.command == "M"
    assert conn.state is ConnectionState.ERROR


@pytest.mark.parametrize("letter", ["C", "H", "T", "U"])
def test_machine_done_refuses_further_commands(letter: str) -> None:
    conn = waiting_for("M")
    conn.send(Shutdown())
    conn.receive_data(encode_command(BY_LETTER[letter]))

    with pytest.raises(RemoteProtocolError, match="connection-level verdict"):
        conn.next_event()


def test_machine_done_still_takes_abort_macros_and_quit() -> None:
    conn = negotiated_connection()
    drive(conn, wire(CONNECT), Reject())
    assert conn.state is ConnectionState.DONE
    macros = Macros(stage="H", values={})

    events = drive(conn, wire(Abort(), macros, Abort(), Quit()))

    assert events == [macros, Quit()]
    assert conn.state is ConnectionState.CLOSED


def test_machine_done_then_eof() -> None:
    conn = negotiated_connection()
    drive(conn, wire(CONNECT), Accept())

    assert drive(conn, b"") == [ConnectionClosed()]
    assert conn.state is ConnectionState.CLOSED


@pytest.mark.parametrize("letters", ["M", "MR", "MRTLNB", "MRTLNBE"])
def test_machine_shutdown_ends_connection(letters: str) -> None:
    conn = waiting_for(letters)

    conn.send(Shutdown())

    assert conn.state is ConnectionState.DONE


@pytest.mark.parametrize("letter", ["C", "H"])
def test_machine_continue_at_connection_level(letter: str) -> None:
    conn = waiting_at_connection_level(letter)

    conn.send(Continue())

    assert conn.state is ConnectionState.SESSION


# --- several messages, and how they end ------------------------------------------------------


def test_machine_several_messages_without_abort() -> None:
    # Sendmail sends no A after a message that got its verdict at end of message (§7).
    conn = connected()
    messages = [
        (EnvFrom(address=f"a{i}@example.org"), EnvRcpt(address=f"b{i}@example.net"), BODY, EOM)
        for i in range(5)
    ]

    events = drive(conn, wire(*(e for message in messages for e in message)))

    assert events == [e for message in messages for e in message]
    assert conn.state is ConnectionState.SESSION


def test_machine_abort_inside_message() -> None:
    conn = connected()

    events = drive(conn, wire(MAIL, RCPT, DATA, HEADER, Abort(), Abort(), MAIL))

    assert events == [MAIL, RCPT, DATA, HEADER, Abort(), MAIL]
    assert conn.state is ConnectionState.MESSAGE


def test_machine_abort_outside_message_swallowed() -> None:
    conn = negotiated_connection()

    assert drive(conn, wire(Abort(), CONNECT, Abort(), HELO, Abort(), Abort())) == [CONNECT, HELO]
    assert conn.state is ConnectionState.SESSION


def test_machine_helo_inside_message_aborts_it() -> None:
    conn = connected()
    helo_macros = Macros(stage="H", values={"{tls_version}": "TLSv1.3"})
    again = Helo(name="again.example.com")

    events = drive(conn, wire(MAIL, RCPT, helo_macros, again, Abort(), MAIL))

    assert events == [MAIL, RCPT, helo_macros, Abort(), again, MAIL]
    assert conn.macros["tls_version"] == "TLSv1.3"


def test_machine_mail_inside_message_aborts_it() -> None:
    conn = connected()
    second = EnvFrom(address="second@example.org")

    events = drive(conn, wire(MAIL, RCPT, DATA, second, RCPT))

    assert events == [MAIL, RCPT, DATA, Abort(), second, RCPT]
    assert conn.state is ConnectionState.MESSAGE


def test_machine_mail_inside_message_keeps_new_mail_macros() -> None:
    conn = connected()
    drive(conn, wire(Macros(stage="M", values={"{mail_addr}": "first@example.org"}), MAIL, RCPT))
    second = EnvFrom(address="second@example.org")

    drive(conn, wire(Macros(stage="M", values={"{mail_addr}": "second@example.org"}), second))

    assert conn.macros.get("mail_addr") == "second@example.org"


def test_machine_quit_inside_message() -> None:
    conn = connected()

    events = drive(conn, wire(MAIL, RCPT, Quit()))

    assert events == [MAIL, RCPT, Abort(), Quit()]
    assert conn.state is ConnectionState.CLOSED
    conn.receive_data(b"")
    assert conn.next_event() is None


def test_machine_quit_outside_message() -> None:
    conn = connected()

    assert drive(conn, wire(Quit())) == [Quit()]
    assert conn.state is ConnectionState.CLOSED


def test_machine_eof_inside_message() -> None:
    conn = connected()
    drive(conn, wire(MAIL, RCPT, DATA))

    events = drive(conn, b"")

    assert events == [Abort(), ConnectionClosed()]
    assert conn.state is ConnectionState.CLOSED
    assert conn.next_event() is None


@pytest.mark.parametrize("prefix", [b"", wire(POSTFIX_OFFER)])
def test_machine_eof_outside_message(prefix: bytes) -> None:
    conn = MilterConnection()
    if prefix:
        drive(conn, prefix)

    assert drive(conn, b"") == [ConnectionClosed()]
    assert conn.state is ConnectionState.CLOSED


@pytest.mark.parametrize("cut", [1, 3, 4, 7])
def test_machine_eof_inside_packet(cut: int) -> None:
    conn = connected()
    conn.receive_data(encode_command(MAIL)[:cut])
    assert conn.next_event() is None

    conn.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="middle of a packet"):
        conn.next_event()
    assert conn.state is ConnectionState.ERROR


def test_machine_eof_while_reply_pending() -> None:
    conn = waiting_for("MR")
    conn.receive_data(b"")

    assert conn.next_event() is None
    conn.send(Continue())
    assert drive(conn, b"") == [Abort(), ConnectionClosed()]


def test_machine_data_after_eof_refused() -> None:
    conn = connected()
    conn.receive_data(b"")

    with pytest.raises(LocalProtocolError, match="after end of file"):
        conn.receive_data(encode_command(MAIL))


# --- QUIT_NC ---------------------------------------------------------------------------------


def test_machine_quit_no_close_starts_new_session() -> None:
    conn = connected()
    drive(conn, wire(Macros(stage="C", values={"j": "mx"}), MAIL, RCPT))
    options = conn.options

    events = drive(conn, wire(QuitNoClose()))

    assert events == [Abort(), QuitNoClose()]
    assert conn.state is ConnectionState.CONNECTING
    assert len(conn.macros) == 0
    assert conn.options is options
    assert drive(conn, wire(CONNECT, HELO, MAIL)) == [CONNECT, HELO, MAIL]


def test_machine_quit_no_close_outside_message() -> None:
    conn = connected()

    assert drive(conn, wire(QuitNoClose(), Macros(stage="C", values={}), CONNECT)) == [
        QuitNoClose(),
        Macros(stage="C", values={}),
        CONNECT,
    ]
    assert conn.state is ConnectionState.SESSION


def test_machine_quit_no_close_after_connection_verdict() -> None:
    conn = negotiated_connection()
    drive(conn, wire(CONNECT), Reject())

    assert drive(conn, wire(QuitNoClose(), CONNECT)) == [QuitNoClose(), CONNECT]
    assert conn.state is ConnectionState.SESSION


def test_machine_second_connect_without_quit_no_close() -> None:
    conn = connected()
    conn.receive_data(encode_command(CONNECT))

    with pytest.raises(RemoteProtocolError, match="CONNECT after") as info:
        conn.next_event()

    assert info.value.command == "C"
    assert conn.state is ConnectionState.ERROR


# --- commands out of order -------------------------------------------------------------------

OUT_OF_ORDER: list[tuple[str, str, str, str]] = [
    # (id, letters sent first (answered with Continue), offending letter, message)
    ("C before O", "", "C", "negotiation first"),
    ("M before O", "", "M", "negotiation first"),
    ("D before O", "", "D", "negotiation first"),
    ("Q before O", "", "Q", "negotiation first"),
    ("A before O", "", "A", "negotiation first"),
    ("O twice", "O", "O", "once per connection"),
    ("O in session", "OCH", "O", "once per connection"),
    ("H before C", "O", "H", "CONNECT first"),
    ("M before C", "O", "M", "CONNECT first"),
    ("R before C", "O", "R", "CONNECT first"),
    ("C after C", "OC", "C", "CONNECT after"),
    ("C in message", "OCM", "C", "CONNECT after"),
    ("R without message", "OCH", "R", "outside a message"),
    ("T without message", "OCH", "T", "outside a message"),
    ("L without message", "OCH", "L", "outside a message"),
    ("N without message", "OCH", "N", "outside a message"),
    ("B without message", "OC", "B", "outside a message"),
    ("E without message", "OC", "E", "outside a message"),
    ("T after message", "OCMRTE", "T", "outside a message"),
    ("R after L", "OCMRTL", "R", "out of order"),
    ("R after T", "OCMRT", "R", "out of order"),
    ("L after B", "OCMRTLNB", "L", "out of order"),
    ("L after N", "OCMRTLN", "L", "out of order"),
    ("T after N", "OCMRTN", "T", "out of order"),
    ("T twice", "OCMRT", "T", "out of order"),
    ("N twice", "OCMRN", "N", "out of order"),
    ("N after B", "OCMRB", "N", "out of order"),
    ("B after E", "OCMRBE", "B", "outside a message"),
]


@pytest.mark.parametrize(
    ("sent", "letter", "match"),
    [case[1:] for case in OUT_OF_ORDER],
    ids=[c[0] for c in OUT_OF_ORDER],
)
def test_machine_out_of_order_command(sent: str, letter: str, match: str) -> None:
    conn = MilterConnection()
    if sent:
        drive(conn, wire(*(BY_LETTER[c] for c in sent)))
    conn.receive_data(encode_command(BY_LETTER[letter]) + encode_command(Quit()))

    with pytest.raises(RemoteProtocolError, match=match) as info:
        conn.next_event()

    assert info.value.command == letter
    assert f"'{letter}'" in str(info.value)
    assert conn.state is ConnectionState.ERROR
    assert not conn.awaiting_reply
    with pytest.raises(RemoteProtocolError, match="already failed"):
        conn.next_event()
    assert conn.state is ConnectionState.ERROR


def test_machine_repeatable_commands_repeat() -> None:
    conn = connected()
    events = [MAIL, RCPT, RCPT, DATA, HEADER, HEADER, EOH, BODY, BODY, BODY, EOM]

    assert drive(conn, wire(*events)) == events


def test_machine_missing_stages_are_fine() -> None:
    conn = connected()

    # No DATA (version 6 MTAs may skip it), no headers, an empty body: all legal.
    assert drive(conn, wire(MAIL, RCPT, EOH, EOM)) == [MAIL, RCPT, EOH, EOM]
    assert drive(conn, wire(MAIL, EOM)) == [MAIL, EOM]


def test_machine_malformed_packet_is_remote_error() -> None:
    conn = connected()
    conn.receive_data(struct.pack("!I", 2) + b"Z!")

    with pytest.raises(RemoteProtocolError, match="unknown command byte"):
        conn.next_event()
    assert conn.state is ConnectionState.ERROR


# --- suppressed events -----------------------------------------------------------------------


def test_machine_rcpt_opens_message_when_mail_suppressed() -> None:
    conn = negotiated_connection(Requirements(events=frozenset({"envrcpt"})))
    # The MTA still sends the D packets of suppressed commands (§3).
    mta = [
        Macros(stage="C", values={"j": "mx"}),
        Macros(stage="H", values={}),
        Macros(stage="M", values={"{mail_addr}": "alice@example.org"}),
        Macros(stage="R", values={"{rcpt_addr}": "bob@example.net"}),
        RCPT,
        RCPT,
        Macros(stage="T", values={"i": "Q1"}),
        Macros(stage="N", values={"i": "Q1"}),
        Macros(stage="E", values={"i": "Q1"}),
        EOM,
    ]
    conn.receive_data(wire(*mta[:5]))

    for event in mta[:4]:
        assert conn.next_event() == event
        assert conn.state is ConnectionState.CONNECTING
    assert conn.next_event() == RCPT
    assert conn.state is ConnectionState.MESSAGE
    assert conn.pending_command == "R"
    conn.send(Continue())
    assert drive(conn, wire(*mta[5:])) == mta[5:]
    assert conn.state is ConnectionState.SESSION
    assert conn.macros["mail_addr"] == "alice@example.org"
    assert drive(conn, wire(Abort(), RCPT)) == [RCPT]
    assert conn.state is ConnectionState.MESSAGE


def test_machine_data_cannot_open_message_when_rcpt_handled() -> None:
    conn = negotiated_connection(Requirements(events=frozenset({"envrcpt"})))
    conn.receive_data(encode_command(DATA))

    with pytest.raises(RemoteProtocolError, match="outside a message"):
        conn.next_event()


def test_machine_eom_alone_when_everything_suppressed() -> None:
    conn = negotiated_connection(Requirements(events=frozenset()))
    mta = [Macros(stage=letter, values={}) for letter in "CHMRTLNBE"]

    events = drive(conn, wire(*mta, EOM, Abort(), EOM))

    assert events == [*mta, EOM, EOM]
    assert conn.state is ConnectionState.SESSION


@pytest.mark.parametrize("first", [HELO, MAIL], ids=["helo", "mail"])
def test_machine_noconnect_lets_session_start_without_connect(first: Event) -> None:
    conn = negotiated_connection(Requirements(events=frozenset({"helo", "envfrom", "envrcpt"})))

    assert drive(conn, wire(Macros(stage="C", values={}), first)) == [
        Macros(stage="C", values={}),
        first,
    ]
    assert conn.state in (ConnectionState.SESSION, ConnectionState.MESSAGE)


def test_machine_suppressed_event_sent_anyway_is_answered() -> None:
    conn = negotiated_connection(Requirements(events=frozenset({"envfrom"})))
    drive(conn, wire(CONNECT))  # NOCONNECT was asked for, NR_CONN too: no reply owed

    assert conn.state is ConnectionState.SESSION
    conn.receive_data(encode_command(MAIL))
    assert conn.next_event() == MAIL
    assert conn.pending_command == "M"


# --- header values ---------------------------------------------------------------------------


def test_machine_leading_space_kept() -> None:
    conn = negotiated_connection(Requirements(leading_space=True))
    drive(conn, wire(CONNECT, MAIL, RCPT, DATA))
    sent = Header(name="Subject", value=" hello  world", leading_space=True)

    [header] = drive(conn, wire(sent))

    assert isinstance(header, Header)
    assert header.leading_space
    assert header.value == " hello  world"
    assert header.raw_value == b" hello  world"
    assert header == sent


def test_machine_header_without_leading_space_flag() -> None:
    conn = connected()
    drive(conn, wire(MAIL, RCPT, DATA))
    folded = Header(name="To", value="a@example.net,\n\tb@example.net")

    [header] = drive(conn, wire(folded))

    assert isinstance(header, Header)
    assert not header.leading_space
    assert header.value == "a@example.net,\n\tb@example.net"


# --- packet size -----------------------------------------------------------------------------


def test_machine_oversized_packet_before_negotiation() -> None:
    conn = MilterConnection()
    conn.receive_data(struct.pack("!I", 65537) + b"O")

    with pytest.raises(FrameTooLargeError, match="65536"):
        conn.next_event()
    assert conn.state is ConnectionState.ERROR


def test_machine_largest_packet_accepted() -> None:
    conn = connected()
    drive(conn, wire(MAIL, RCPT))
    chunk = Body(chunk=b"x" * 65535)

    assert drive(conn, wire(chunk)) == [chunk]


def test_machine_oversized_header_after_negotiation() -> None:
    conn = connected()
    drive(conn, wire(MAIL, RCPT, DATA))
    conn.receive_data(encode_command(Header(name="X-Long", value="v" * 70_000)))

    with pytest.raises(FrameTooLargeError, match="exceeds the maximum of 65535"):
        conn.next_event()
    assert conn.state is ConnectionState.ERROR
    with pytest.raises(RemoteProtocolError):
        conn.next_event()


def test_machine_larger_limit_takes_postfix_long_header() -> None:
    # Postfix sends a header in one packet, up to header_size_limit (102,400 bytes).
    conn = negotiated_connection(max_data_size=1048575)
    drive(conn, wire(CONNECT, MAIL, RCPT, DATA))
    long_header = Header(name="X-Long", value="v" * (100 * 1024 - 8))

    assert drive(conn, wire(long_header, EOH)) == [long_header, EOH]


def test_machine_mds_256k_takes_larger_body_chunk() -> None:
    offer = Negotiate(
        version=6, actions=ActionFlag.ALL, protocol=ProtocolFlag.ALL | ProtocolFlag.MDS_256K
    )
    conn = negotiated_connection(Requirements(max_data_size=262143), offer)
    drive(conn, wire(CONNECT, MAIL, RCPT))
    chunk = Body(chunk=b"b" * (200 * 1024))

    assert drive(conn, wire(chunk)) == [chunk]
    conn.receive_data(encode_command(Body(chunk=b"b" * 262144)))
    with pytest.raises(FrameTooLargeError, match="262143"):
        conn.next_event()


# --- answers chosen by a function ------------------------------------------------------------


def test_machine_drive_with_answer_function() -> None:
    refusal = Reject(code=550, xcode="5.1.1", text="no such user")

    def answer(event: Event) -> Reply:
        if isinstance(event, Negotiate):
            return negotiate(event, Requirements())
        if isinstance(event, EnvRcpt) and event.address.startswith("nobody"):
            return refusal
        return Continue()

    conn = MilterConnection()
    sent: list[tuple[Reply, bytes]] = []
    nobody = EnvRcpt(address="nobody@example.net")

    events = drive(conn, wire(POSTFIX_OFFER, CONNECT, MAIL, nobody, RCPT, EOM), answer, sent=sent)

    assert events == [POSTFIX_OFFER, CONNECT, MAIL, nobody, RCPT, EOM]
    assert [reply for reply, _ in sent][1:] == [
        Continue(),
        Continue(),
        refusal,
        Continue(),
        Continue(),
    ]
    assert decode_responses(sent[3][1]) == [refusal]


# --- the Continue shortcuts of the per-packet path ------------------------------------------


def test_continue_if_owed_answers_only_what_is_owed() -> None:
    conn = negotiated_connection()
    assert conn.continue_if_owed() == b""  # nothing waits: nothing to write
    conn.receive_data(wire(CONNECT))
    assert conn.next_event() == CONNECT
    assert decode_responses(conn.continue_if_owed()) == [Continue()]
    assert not conn.awaiting_reply
    assert conn.continue_if_owed() == b""


def test_continue_if_owed_at_end_of_message_ends_the_message() -> None:
    conn = negotiated_connection()
    conn.receive_data(wire(CONNECT, Helo(name="h"), EnvFrom(address="a@b"), EndOfMessage()))
    for _ in range(3):
        conn.next_event()
        conn.continue_if_owed()
    assert conn.state is ConnectionState.MESSAGE
    assert conn.next_event() == EndOfMessage()
    assert decode_responses(conn.continue_if_owed()) == [Continue()]
    assert conn.state is ConnectionState.SESSION


def test_continue_if_owed_cannot_answer_negotiation() -> None:
    conn = MilterConnection()
    conn.receive_data(encode_command(POSTFIX_OFFER))
    conn.next_event()
    with pytest.raises(LocalProtocolError, match="negotiation"):
        conn.continue_if_owed()


# --- commands kept undecoded --------------------------------------------------------------

_UNDECODED = frozenset(b"CHMR")


def _undecoded_connection(
    needs: Requirements, offer: Negotiate = POSTFIX_OFFER
) -> MilterConnection:
    conn = MilterConnection(undecoded=_UNDECODED)
    conn.receive_data(encode_command(offer))
    assert conn.next_event() == offer
    conn.send(negotiate(offer, needs))
    return conn


def _payload(event: Event) -> bytes:
    return encode_command(event)[5:]


def test_undecoded_commands_without_replies_are_kept_without_events() -> None:
    recorded = frozenset({"connect", "helo", "envfrom", "envrcpt"})
    conn = _undecoded_connection(Requirements(events=recorded, no_reply=recorded))
    events = drive(conn, wire(CONNECT, HELO, MAIL, RCPT, RCPT, EOM))
    assert events == [EOM]  # the others came, but needed no event
    assert conn.kept == [
        (ord("C"), _payload(CONNECT)),
        (ord("H"), _payload(HELO)),
        (ord("M"), _payload(MAIL)),
        (ord("R"), _payload(RCPT)),
        (ord("R"), _payload(RCPT)),
    ]
    assert all(type(payload) is bytes for _, payload in conn.kept)  # not views of a buffer
    assert conn.state is ConnectionState.SESSION  # the state moved as for decoded commands


def test_undecoded_commands_that_need_replies_come_as_unparsed() -> None:
    # An MTA without the NR_* flags waits for a reply to each: handed out, undecoded.
    recorded = frozenset({"connect", "helo", "envfrom", "envrcpt"})
    offer = POSTFIX_OFFER.model_copy(update={"protocol": ProtocolFlag.NONE})
    conn = _undecoded_connection(Requirements(events=recorded, no_reply=recorded), offer)
    conn.receive_data(wire(CONNECT, MAIL))
    assert conn.next_event() is UNPARSED
    assert conn.unparsed == (ord("C"), _payload(CONNECT))
    assert conn.pending_command == "C"
    conn.send(Continue())
    assert conn.next_event() is UNPARSED
    assert conn.unparsed == (ord("M"), _payload(MAIL))
    assert conn.kept == []


def test_an_undecoded_mail_inside_a_message_comes_after_its_abort() -> None:
    # The synthesised abort of the open message must reach the caller before the new MAIL.
    recorded = frozenset({"connect", "helo", "envfrom", "envrcpt"})
    conn = _undecoded_connection(Requirements(events=recorded, no_reply=recorded))
    drive(conn, wire(CONNECT, HELO, MAIL))
    conn.kept.clear()
    conn.receive_data(wire(MAIL))
    assert conn.next_event() == Abort()
    assert conn.next_event() is UNPARSED
    assert conn.unparsed == (ord("M"), _payload(MAIL))
    assert conn.kept == []


def test_a_malformed_undecoded_command_is_not_refused_by_the_machine() -> None:
    recorded = frozenset({"connect", "helo", "envfrom", "envrcpt"})
    conn = _undecoded_connection(Requirements(events=recorded, no_reply=recorded))
    drive(conn, wire(CONNECT, HELO))
    conn.receive_data(b"\x00\x00\x00\x04Mabc")  # no NUL: whoever decodes it finds out
    assert conn.next_event() is None
    assert conn.kept[-1] == (ord("M"), b"abc")
