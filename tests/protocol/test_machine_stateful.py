"""MilterConnection under random traffic: legal and illegal MTA commands, any reply, any order.

A hypothesis rule-based state machine plays a reckless MTA and a reckless milter against one
connection and checks the promises of ``machine.py``'s theory of operation: bad input is a
RemoteProtocolError and leaves the machine in ERROR for good, a bad reply is a
LocalProtocolError that changes nothing, nothing else is ever raised, and what ``send()``
returns is exactly the reply on the wire.
"""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

from milterapp.constants import ActionFlag, ConnectionState, MacroStage, ProtocolFlag
from milterapp.errors import LocalProtocolError, NegotiationError, RemoteProtocolError
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
from milterapp.protocol.codec import encode_command
from milterapp.protocol.machine import MilterConnection
from milterapp.protocol.negotiation import OPTIONAL_EVENTS, Requirements, negotiate
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
from tests.protocol.helpers import POSTFIX_OFFER, decode_responses

# --- what the MTA may send -------------------------------------------------------------------

words = st.text(alphabet="abcdefghijklmnopqrstuvwxyz", min_size=1, max_size=8)
addresses = st.builds(lambda a, b: f"{a}@{b}.example", words, words)
offers = st.one_of(
    st.just(POSTFIX_OFFER),
    st.just(Negotiate(version=2, actions=ActionFlag.ALL, protocol=ProtocolFlag.V2)),
    st.builds(
        Negotiate,
        version=st.integers(min_value=0, max_value=8),
        actions=st.integers(min_value=0, max_value=0x1FF).map(ActionFlag),
        protocol=st.one_of(
            st.just(ProtocolFlag.V2),
            st.integers(min_value=0, max_value=0x1FFFFF).map(ProtocolFlag),
            st.just(ProtocolFlag.ALL | ProtocolFlag.MDS_256K),
        ),
    ),
)
connects = st.one_of(
    st.just(Connect(hostname="unknown", family=AddressFamily.UNKNOWN)),
    st.builds(
        lambda port: Connect(
            hostname="mail.example.com",
            family=AddressFamily.INET,
            port=port,
            address=ipaddress.IPv4Address("198.51.100.7"),
        ),
        st.integers(min_value=0, max_value=65535),
    ),
)
macros = st.builds(
    Macros,
    stage=st.sampled_from("CHMRTLNBEUx"),
    values=st.dictionaries(st.sampled_from(["i", "j", "{mail_addr}", "{rcpt_addr}"]), words),
)
esmtp = st.lists(st.sampled_from(["SIZE=100", "BODY=8BITMIME", "SMTPUTF8"]), max_size=2)
header_values = st.text(alphabet="abc xyz\t:;", max_size=20)
commands: st.SearchStrategy[Event] = st.one_of(
    offers,
    macros,
    connects,
    st.builds(Helo, name=words),
    st.builds(lambda a, args: EnvFrom(address=a, args=args), addresses, esmtp),
    st.builds(lambda a, args: EnvRcpt(address=a, args=args), addresses, esmtp),
    st.just(Data()),
    st.builds(lambda n, v: Header(name=n, value=v), words, header_values),
    st.just(EndOfHeaders()),
    st.builds(Body, chunk=st.binary(min_size=1, max_size=64)),
    st.builds(EndOfMessage, chunk=st.sampled_from([b"", b"tail\r\n"])),
    st.builds(Unknown, line=words),
    st.just(Abort()),
    st.just(Quit()),
    st.just(QuitNoClose()),
)

# Commands an MTA would plausibly send next, so that runs get past the first few steps.
_NEXT_IN_MESSAGE = {
    2: "RRUD",
    3: "TRLNBEAUD",
    4: "LLNBEAD",
    5: "NLLBEAD",
    6: "BBEAD",
    7: "EBBAD",
}


def plausible_letters(conn: MilterConnection) -> str:
    """Return letters of commands an MTA would plausibly send next (the likeliest first)."""
    state = conn.state
    if state is ConnectionState.NEGOTIATING:
        return "O"
    if state is ConnectionState.CONNECTING:
        return "CCUD"
    if state is ConnectionState.SESSION:
        return "MMMHUAKD"
    if state is ConnectionState.MESSAGE:
        return _NEXT_IN_MESSAGE.get(conn.rank, "AD")
    if state is ConnectionState.DONE:
        return "QAKD"
    return "OCMRQ"


_BY_LETTER: dict[str, st.SearchStrategy[Event]] = {
    "O": offers,
    "D": macros,
    "C": connects,
    "H": st.builds(Helo, name=words),
    "M": st.builds(lambda a: EnvFrom(address=a), addresses),
    "R": st.builds(lambda a: EnvRcpt(address=a), addresses),
    "T": st.just(Data()),
    "L": st.builds(lambda n, v: Header(name=n, value=v), words, header_values),
    "N": st.just(EndOfHeaders()),
    "B": st.builds(Body, chunk=st.binary(min_size=1, max_size=64)),
    "E": st.just(EndOfMessage()),
    "U": st.builds(Unknown, line=words),
    "A": st.just(Abort()),
    "Q": st.just(Quit()),
    "K": st.just(QuitNoClose()),
}

# --- what the milter may send ----------------------------------------------------------------

# No digits in reply text: "5.7.1 text" without an xcode would decode with one.
reply_text = st.one_of(
    st.none(), st.lists(st.text(alphabet="abc xyz%-", max_size=12), min_size=1, max_size=3)
)
header_names = st.text(alphabet="abcdefXYZ-", min_size=1, max_size=10)
edit_values = st.text(alphabet="abc xyz;", max_size=20)
verdicts: st.SearchStrategy[Reply] = st.one_of(
    st.sampled_from([Continue(), Accept(), Discard(), Skip(), Shutdown(), Reject(), TempFail()]),
    st.builds(
        Reject,
        code=st.sampled_from([None, 550, 554]),
        xcode=st.sampled_from([None, "5.7.1"]),
        text=reply_text,
    ),
    st.builds(
        TempFail,
        code=st.sampled_from([None, 421, 451]),
        xcode=st.sampled_from([None, "4.7.1"]),
        text=reply_text,
    ),
)
modifications: st.SearchStrategy[Reply] = st.one_of(
    st.builds(AddHeader, name=header_names, value=edit_values),
    st.builds(
        InsertHeader,
        index=st.integers(min_value=0, max_value=0xFFFFFFFF),
        name=header_names,
        value=edit_values,
    ),
    st.builds(
        ChangeHeader,
        index=st.integers(min_value=0, max_value=5),
        name=header_names,
        value=edit_values,
    ),
    st.builds(AddRecipient, address=addresses, args=st.sampled_from([None, "", "NOTIFY=NEVER"])),
    st.builds(DeleteRecipient, address=addresses),
    st.builds(ChangeSender, address=addresses, args=st.sampled_from([None, "RET=HDRS"])),
    st.builds(Quarantine, reason=words),
    st.builds(ReplaceBody, chunk=st.binary(max_size=32)),
    st.just(Progress()),
)
negotiation_replies = st.builds(
    NegotiationReply,
    version=st.integers(min_value=0, max_value=8),
    actions=st.integers(min_value=0, max_value=0x1FF).map(ActionFlag),
    protocol=st.integers(min_value=0, max_value=0x1FFFFF).map(ProtocolFlag),
    macros=st.dictionaries(
        st.sampled_from(list(MacroStage)), st.lists(st.sampled_from(["i", "{x}"])).map(tuple)
    ),
)
replies: st.SearchStrategy[Reply] = st.one_of(verdicts, modifications, negotiation_replies)
requirements = st.builds(
    Requirements,
    events=st.frozensets(st.sampled_from(sorted(OPTIONAL_EVENTS))),
    no_reply=st.frozensets(st.sampled_from(sorted(OPTIONAL_EVENTS))),
    actions=st.integers(min_value=0, max_value=0x1FF).map(ActionFlag),
    skip=st.booleans(),
    leading_space=st.booleans(),
    max_data_size=st.sampled_from([65535, 262143]),
)

_NOT_FINAL = (Progress, AddHeader, InsertHeader, ChangeHeader, AddRecipient, DeleteRecipient)
_NOT_FINAL += (ChangeSender, Quarantine, ReplaceBody)


class ConnectionRules(RuleBasedStateMachine):
    """One MilterConnection against a random MTA and a random milter."""

    def __init__(self) -> None:
        super().__init__()
        self.conn = MilterConnection()
        self.failed = False  # a RemoteProtocolError came out of next_event()
        self.eof = False

    @initialize(negotiated=st.booleans(), offer=offers, needs=requirements)
    def start(self, negotiated: bool, offer: Negotiate, needs: Requirements) -> None:
        if not negotiated:
            return
        self.conn.receive_data(encode_command(offer))
        assert self.conn.next_event() == offer
        try:
            self.conn.send(negotiate(offer, needs))
        except NegotiationError:
            return  # the offer is too old for the needs: O stays unanswered
        assert self.conn.state is ConnectionState.CONNECTING

    # --- the MTA side ------------------------------------------------------------------------

    def pump(self) -> None:
        """Pull events until one waits for a reply, none is left, or the MTA broke the rules."""
        while not self.conn.awaiting_reply:
            try:
                event = self.conn.next_event()
            except RemoteProtocolError:
                self.failed = True
                assert self.conn.state is ConnectionState.ERROR
                assert not self.conn.awaiting_reply
                with pytest.raises(RemoteProtocolError, match="already failed"):
                    self.conn.next_event()
                return
            if event is None:
                return
            assert self.conn.state is not ConnectionState.ERROR
        assert self.conn.pending_command is not None

    def feed(self, data: bytes) -> None:
        self.conn.receive_data(data)
        self.pump()

    def mta_sends(self, data: st.DataObject, how: str) -> None:
        if how == "eof":
            self.eof = True
            self.feed(b"")
            return
        if how == "any":
            event = data.draw(commands, label="any command")
        else:
            letter = data.draw(st.sampled_from(plausible_letters(self.conn)), label="letter")
            event = data.draw(_BY_LETTER[letter], label="plausible command")
        packet = encode_command(event)
        if how == "split":
            cut = data.draw(st.integers(min_value=1, max_value=len(packet)), label="cut")
            self.feed(packet[:cut])
            if packet[cut:]:
                self.feed(packet[cut:])
        else:
            self.feed(packet)

    def mta_writes_ahead(self, event: Macros) -> None:
        # While a reply is owed the MTA has nothing to send but what it wrote ahead (macros,
        # here); the machine must hold it back.
        pending = self.conn.pending_command
        self.feed(encode_command(event))
        assert self.conn.pending_command == pending

    # --- the milter side ---------------------------------------------------------------------

    def answer(self, reply: Reply) -> None:
        conn = self.conn
        awaiting, pending, state = conn.awaiting_reply, conn.pending_command, conn.state
        skipped = conn.skipped
        try:
            out = conn.send(reply)
        except LocalProtocolError:
            # Refused replies change nothing: the caller can still send a fallback.
            assert conn.awaiting_reply == awaiting
            assert conn.pending_command == pending
            assert conn.state is state
            assert conn.skipped == skipped
            return
        assert awaiting, "a reply was accepted while no command waited for one"
        sent = decode_responses(out)
        if isinstance(reply, ReplaceBody):
            assert conn.options is not None
            limit = conn.options.max_data_size
            assert all(isinstance(packet, ReplaceBody) for packet in sent)
            chunks = [packet.chunk for packet in sent if isinstance(packet, ReplaceBody)]
            assert b"".join(chunks) == reply.chunk
            assert all(len(chunk) <= limit for chunk in chunks)
        else:
            assert sent == [reply]
        if isinstance(reply, _NOT_FINAL):
            assert pending == "E"
            assert conn.awaiting_reply
            assert conn.pending_command == "E"
        else:
            assert not conn.awaiting_reply
        self.pump()

    def milter_sends(self, data: st.DataObject) -> None:
        pending = self.conn.pending_command
        offer = self.conn.offer
        reply: Reply
        if pending == "O" and offer is not None:
            try:
                reply = negotiate(offer, data.draw(requirements, label="needs"))
            except NegotiationError:
                return  # a real milter would close the connection
        elif pending == "E":
            kind = data.draw(st.sampled_from(["verdict", "modification", "modification"]))
            reply = data.draw(verdicts if kind == "verdict" else modifications, label="reply")
        elif pending == "B":
            reply = data.draw(st.sampled_from([Continue(), Skip(), Continue()]), label="reply")
        else:
            reply = data.draw(st.one_of(st.just(Continue()), verdicts), label="reply")
        self.answer(reply)

    # --- the rule ----------------------------------------------------------------------------

    # One rule that picks its move itself: hypothesis's own rule choice (swarm testing, bias
    # towards the first rules) starves the deep states. sampled_from favours its first
    # element, so the common move comes first.
    @rule(data=st.data())
    def step(self, data: st.DataObject) -> None:
        if self.conn.awaiting_reply:
            moves = ["reply"] * 6 + ["any reply", "large body", "write ahead"]
        else:
            moves = ["plausible"] * 8 + ["split", "any", "stray reply", "eof"]
        if self.eof:
            moves = [
                m for m in moves if m not in ("plausible", "split", "any", "eof", "write ahead")
            ]
        if not moves:
            return
        move = data.draw(st.sampled_from(moves), label="move")
        if move in ("plausible", "split", "any", "eof"):
            self.mta_sends(data, move)
        elif move == "write ahead":
            self.mta_writes_ahead(data.draw(macros, label="macros"))
        elif move == "reply":
            self.milter_sends(data)
        elif move == "large body":
            # Built here rather than drawn: hypothesis warns about arguments with a huge repr.
            size = data.draw(st.sampled_from([65535, 65536, 140_000, 262144]), label="size")
            self.answer(ReplaceBody(chunk=b"x" * size))
        else:
            self.answer(data.draw(replies, label="any reply"))

    # --- invariants --------------------------------------------------------------------------

    @invariant()
    def error_is_final(self) -> None:
        if self.failed:
            assert self.conn.state is ConnectionState.ERROR

    @invariant()
    def pending_matches_awaiting(self) -> None:
        assert self.conn.awaiting_reply == (self.conn.pending_command is not None)

    @invariant()
    def message_state_has_rank(self) -> None:
        if self.conn.state is ConnectionState.MESSAGE:
            assert 2 <= self.conn.rank <= 8


def test_machine_survives_random_traffic() -> None:
    run_state_machine_as_test(
        ConnectionRules, settings=settings(max_examples=100, stateful_step_count=40)
    )
