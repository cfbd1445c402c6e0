"""Option negotiation: negotiate() and session_options() (protocol reference §2)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from milterapp.constants import ActionFlag, MacroStage, ProtocolFlag
from milterapp.errors import LocalProtocolError, NegotiationError
from milterapp.events import Negotiate
from milterapp.protocol.negotiation import (
    OPTIONAL_EVENTS,
    Requirements,
    SessionOptions,
    negotiate,
    session_options,
)
from milterapp.protocol.stages import OptionalEvent
from milterapp.replies import NegotiationReply
from tests.protocol.helpers import POSTFIX_OFFER, negotiated_connection

# event -> (NO flag, NR flag), from the table in §3.
EVENT_FLAGS: dict[OptionalEvent, tuple[ProtocolFlag, ProtocolFlag]] = {
    "connect": (ProtocolFlag.NOCONNECT, ProtocolFlag.NR_CONN),
    "helo": (ProtocolFlag.NOHELO, ProtocolFlag.NR_HELO),
    "envfrom": (ProtocolFlag.NOMAIL, ProtocolFlag.NR_MAIL),
    "envrcpt": (ProtocolFlag.NORCPT, ProtocolFlag.NR_RCPT),
    "data": (ProtocolFlag.NODATA, ProtocolFlag.NR_DATA),
    "unknown": (ProtocolFlag.NOUNKNOWN, ProtocolFlag.NR_UNKN),
    "header": (ProtocolFlag.NOHDRS, ProtocolFlag.NR_HDR),
    "eoh": (ProtocolFlag.NOEOH, ProtocolFlag.NR_EOH),
    "body": (ProtocolFlag.NOBODY, ProtocolFlag.NR_BODY),
}
NO_FLAGS = ProtocolFlag.NONE
NR_FLAGS = ProtocolFlag.NONE
for _no, _nr in EVENT_FLAGS.values():
    NO_FLAGS |= _no
    NR_FLAGS |= _nr
MDS_BITS = ProtocolFlag.MDS_256K | ProtocolFlag.MDS_1M

#: Postfix with milter_protocol = 2 (§2): actions 0x1FF for every version, protocol mask 0x7F.
POSTFIX_V2_OFFER = Negotiate(version=2, actions=ActionFlag.ALL, protocol=ProtocolFlag.V2)


def test_negotiate_full_offer_default_requirements() -> None:
    reply = negotiate(POSTFIX_OFFER, Requirements())

    assert reply.version == 6
    assert reply.actions == ActionFlag.ALL & ~ActionFlag.SETSYMLIST
    assert not reply.protocol & (NO_FLAGS | NR_FLAGS)
    assert reply.protocol & ProtocolFlag.SKIP
    assert not reply.protocol & (ProtocolFlag.RCPT_REJ | ProtocolFlag.HDR_LEADSPC | MDS_BITS)
    assert reply.macros == {}
    options = session_options(POSTFIX_OFFER, reply)
    assert options.skip
    assert not options.leading_space
    assert options.max_data_size == 65535


@pytest.mark.parametrize("event", sorted(EVENT_FLAGS))
def test_negotiate_unhandled_event_gets_no_and_nr_flags(event: OptionalEvent) -> None:
    reply = negotiate(POSTFIX_OFFER, Requirements(events=OPTIONAL_EVENTS - {event}))

    no_flag, nr_flag = EVENT_FLAGS[event]
    assert reply.protocol & (NO_FLAGS | NR_FLAGS) == no_flag | nr_flag
    options = session_options(POSTFIX_OFFER, reply)
    assert options.suppressed(event)


@pytest.mark.parametrize("event", sorted(EVENT_FLAGS))
def test_negotiate_no_reply_event_gets_only_nr_flag(event: OptionalEvent) -> None:
    reply = negotiate(POSTFIX_OFFER, Requirements(no_reply=frozenset({event})))

    _, nr_flag = EVENT_FLAGS[event]
    assert reply.protocol & (NO_FLAGS | NR_FLAGS) == nr_flag
    options = session_options(POSTFIX_OFFER, reply)
    assert not options.suppressed(event)


def test_negotiate_no_events_suppresses_all_but_eom() -> None:
    reply = negotiate(POSTFIX_OFFER, Requirements(events=frozenset()))

    assert reply.protocol & (NO_FLAGS | NR_FLAGS) == NO_FLAGS | NR_FLAGS
    options = session_options(POSTFIX_OFFER, reply)
    assert options.reply_expected(ord("E"))
    assert not any(options.reply_expected(ord(c)) for c in "CHMRTLNBUDAQK")


def test_negotiate_features_on_request() -> None:
    needs = Requirements(leading_space=True, rejected_recipients=True, skip=False)

    reply = negotiate(POSTFIX_OFFER, needs)

    assert reply.protocol & ProtocolFlag.HDR_LEADSPC
    assert reply.protocol & ProtocolFlag.RCPT_REJ
    assert not reply.protocol & ProtocolFlag.SKIP
    options = session_options(POSTFIX_OFFER, reply)
    assert options.leading_space
    assert not options.skip


def test_negotiate_actions_narrowed_by_requirements_and_offer() -> None:
    offer = Negotiate(version=6, actions=ActionFlag.V2, protocol=ProtocolFlag.ALL)
    needs = Requirements(actions=ActionFlag.ADDHDRS | ActionFlag.CHGFROM | ActionFlag.CHGHDRS)

    reply = negotiate(offer, needs)

    assert reply.actions == ActionFlag.ADDHDRS | ActionFlag.CHGHDRS


def test_negotiate_requests_required_actions() -> None:
    needs = Requirements(actions=ActionFlag.ADDHDRS, required_actions=ActionFlag.CHGFROM)

    reply = negotiate(POSTFIX_OFFER, needs)

    assert reply.actions & ActionFlag.CHGFROM


def test_negotiate_required_protocol_is_requested() -> None:
    needs = Requirements(required_protocol=ProtocolFlag.RCPT_REJ | ProtocolFlag.NR_HDR)

    reply = negotiate(POSTFIX_OFFER, needs)

    assert reply.protocol & ProtocolFlag.RCPT_REJ
    assert reply.protocol & ProtocolFlag.NR_HDR


# --- old and new protocol versions ---------------------------------------------------------


def test_negotiate_postfix_version_2_offer() -> None:
    reply = negotiate(POSTFIX_V2_OFFER, Requirements())

    assert reply.version == 2
    assert reply.protocol & ~ProtocolFlag.V2 == ProtocolFlag.NONE
    assert not reply.protocol & NR_FLAGS  # none of them lies inside 0x7F
    assert not reply.protocol & ProtocolFlag.SKIP
    options = session_options(POSTFIX_V2_OFFER, reply)
    assert not options.skip


def test_negotiate_version_2_unhandled_events_keep_only_offered_flags() -> None:
    reply = negotiate(POSTFIX_V2_OFFER, Requirements(events=frozenset({"envfrom"})))

    # NOUNKNOWN and NODATA lie outside 0x7F: a version 2 MTA sends neither U nor T anyway.
    expected = NO_FLAGS & ProtocolFlag.V2 & ~ProtocolFlag.NOMAIL
    assert reply.protocol == expected
    options = session_options(POSTFIX_V2_OFFER, reply)
    assert options.suppressed("unknown")
    assert options.suppressed("data")
    assert not options.suppressed("envfrom")


def test_session_options_version_2_expects_every_reply() -> None:
    conn = negotiated_connection(offer=POSTFIX_V2_OFFER)

    options = conn.options
    assert options is not None
    assert options.version == 2
    for letter in "CHMRTLNBEU":
        assert options.reply_expected(ord(letter)), letter
    for letter in "DAQK":
        assert not options.reply_expected(ord(letter)), letter
    # Not sent at version 2 (U is version 3, T version 4).
    assert options.suppressed("unknown")
    assert options.suppressed("data")
    assert not options.suppressed("header")
    assert not options.skip


@pytest.mark.parametrize(("offered", "suppressed"), [(3, {"data"}), (4, set()), (6, set())])
def test_session_options_suppressed_by_version(offered: int, suppressed: set[str]) -> None:
    offer = Negotiate(version=offered, actions=ActionFlag.ALL, protocol=ProtocolFlag.ALL)

    options = session_options(offer, negotiate(offer, Requirements()))

    late: tuple[OptionalEvent, ...] = ("unknown", "data")
    assert {event for event in late if options.suppressed(event)} == suppressed


@pytest.mark.parametrize("version", [0, 1])
def test_negotiate_version_below_2_fails(version: int) -> None:
    offer = Negotiate(version=version, actions=ActionFlag.ALL, protocol=ProtocolFlag.ALL)

    with pytest.raises(NegotiationError, match="version") as info:
        negotiate(offer, Requirements())

    assert info.value.missing == ["version"]


def test_negotiate_version_above_6_answers_6() -> None:
    offer = Negotiate(version=7, actions=ActionFlag.ALL, protocol=ProtocolFlag.ALL)

    reply = negotiate(offer, Requirements())

    assert reply.version == 6
    assert session_options(offer, reply).version == 6


def test_negotiate_lower_version_requested() -> None:
    reply = negotiate(POSTFIX_OFFER, Requirements(version=4))

    assert reply.version == 4
    options = session_options(POSTFIX_OFFER, reply)
    assert not options.suppressed("data")


# --- requirements the offer cannot meet ----------------------------------------------------


def test_negotiate_required_action_not_offered() -> None:
    offer = Negotiate(version=6, actions=ActionFlag.V2, protocol=ProtocolFlag.ALL)

    with pytest.raises(NegotiationError, match="CHGFROM") as info:
        negotiate(offer, Requirements(required_actions=ActionFlag.CHGFROM))

    assert info.value.missing == ["CHGFROM"]


def test_negotiate_required_actions_all_missing_named() -> None:
    offer = Negotiate(version=6, actions=ActionFlag.V1, protocol=ProtocolFlag.ALL)
    needs = Requirements(required_actions=ActionFlag.CHGFROM | ActionFlag.QUARANTINE)

    with pytest.raises(NegotiationError, match="QUARANTINE") as info:
        negotiate(offer, needs)

    assert sorted(info.value.missing) == ["CHGFROM", "QUARANTINE"]


def test_negotiate_required_skip_with_version_2_offer() -> None:
    with pytest.raises(NegotiationError, match="SKIP") as info:
        negotiate(POSTFIX_V2_OFFER, Requirements(required_protocol=ProtocolFlag.SKIP))

    assert info.value.missing == ["SKIP"]


def test_negotiate_required_features_offered_succeeds() -> None:
    needs = Requirements(
        required_actions=ActionFlag.CHGFROM | ActionFlag.ADDRCPT_PAR,
        required_protocol=ProtocolFlag.SKIP | ProtocolFlag.HDR_LEADSPC,
    )

    reply = negotiate(POSTFIX_OFFER, needs)

    assert reply.actions & (ActionFlag.CHGFROM | ActionFlag.ADDRCPT_PAR)
    assert reply.protocol & (ProtocolFlag.SKIP | ProtocolFlag.HDR_LEADSPC)


# --- macro lists ---------------------------------------------------------------------------


def test_negotiate_macros_requested_per_stage() -> None:
    macros = {
        MacroStage.CONNECT: ("{client_addr}", "{client_name}"),
        MacroStage.ENVFROM: ("{auth_authen}", "i"),
        MacroStage.EOM: ("{msg_id}",),
    }

    reply = negotiate(POSTFIX_OFFER, Requirements(macros=macros))

    assert reply.actions & ActionFlag.SETSYMLIST
    # An empty end-of-header list comes with the end-of-message one: Sendmail ignores an EOM
    # list sent alone (confirmed by tests/e2e/test_sendmail.py).
    assert reply.macros == {**macros, MacroStage.EOH: ()}
    session_options(POSTFIX_OFFER, reply)


def test_negotiate_keeps_an_explicit_eoh_list_with_eom() -> None:
    macros = {MacroStage.EOM: ("i",), MacroStage.EOH: ("{mail_addr}",)}
    assert negotiate(POSTFIX_OFFER, Requirements(macros=macros)).macros == macros


def test_negotiate_macros_dropped_without_setsymlist() -> None:
    offer = Negotiate(version=6, actions=ActionFlag.V2, protocol=ProtocolFlag.ALL)

    reply = negotiate(offer, Requirements(macros={MacroStage.HELO: ("{tls_version}",)}))

    assert reply.macros == {}
    assert not reply.actions & ActionFlag.SETSYMLIST


@pytest.mark.parametrize("name", ["client addr", "a,b", "", "x\x00"])
def test_requirements_invalid_macro_name(name: str) -> None:
    with pytest.raises(ValidationError, match="macro name"):
        Requirements(macros={MacroStage.CONNECT: (name,)})


# --- packet size (MDS) ---------------------------------------------------------------------


def test_negotiate_mds_256k_accepted() -> None:
    offer = Negotiate(
        version=6, actions=ActionFlag.ALL, protocol=ProtocolFlag.ALL | ProtocolFlag.MDS_256K
    )

    reply = negotiate(offer, Requirements(max_data_size=262143))

    assert reply.protocol & MDS_BITS == ProtocolFlag.MDS_256K
    assert session_options(offer, reply).max_data_size == 262143


def test_negotiate_mds_default_requirements_stay_at_64k() -> None:
    offer = Negotiate(
        version=6, actions=ActionFlag.ALL, protocol=ProtocolFlag.ALL | ProtocolFlag.MDS_256K
    )

    reply = negotiate(offer, Requirements())

    assert not reply.protocol & MDS_BITS
    assert session_options(offer, reply).max_data_size == 65535


def test_negotiate_mds_1m_offered_but_256k_wanted() -> None:
    offer = Negotiate(
        version=6, actions=ActionFlag.ALL, protocol=ProtocolFlag.ALL | ProtocolFlag.MDS_1M
    )

    reply = negotiate(offer, Requirements(max_data_size=262143))

    assert not reply.protocol & MDS_BITS
    assert session_options(offer, reply).max_data_size == 65535


def test_negotiate_mds_both_offered_largest_wanted() -> None:
    offer = Negotiate(version=6, actions=ActionFlag.ALL, protocol=ProtocolFlag.ALL | MDS_BITS)

    reply = negotiate(offer, Requirements(max_data_size=1048575))

    assert reply.protocol & MDS_BITS == ProtocolFlag.MDS_1M
    assert session_options(offer, reply).max_data_size == 1048575


# --- zero means the version 1 defaults -----------------------------------------------------


def test_negotiate_zero_offer_read_as_version_1_defaults() -> None:
    offer = Negotiate(version=6, actions=ActionFlag.NONE, protocol=ProtocolFlag.NONE)

    reply = negotiate(offer, Requirements(events=frozenset({"envfrom"}), macros={}))

    assert reply.actions == ActionFlag.V1
    assert reply.protocol == ProtocolFlag.V1 & ~ProtocolFlag.NOMAIL
    session_options(offer, reply)
    with pytest.raises(LocalProtocolError, match="QUARANTINE"):
        session_options(offer, NegotiationReply(version=6, actions=ActionFlag.QUARANTINE))
    with pytest.raises(LocalProtocolError, match="NR_HDR"):
        session_options(offer, NegotiationReply(version=6, protocol=ProtocolFlag.NR_HDR))


# --- session_options checks the reply -----------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "match"),
    [
        (NegotiationReply(version=7), "version 7"),
        (NegotiationReply(version=1), "version 1"),
        (NegotiationReply(version=6, actions=ActionFlag.CHGFROM), "CHGFROM"),
        (NegotiationReply(version=6, protocol=ProtocolFlag.SKIP), "SKIP"),
        (NegotiationReply(version=6, protocol=ProtocolFlag.MDS_256K), "MDS_256K"),
    ],
)
def test_session_options_rejects_reply_beyond_offer(reply: NegotiationReply, match: str) -> None:
    offer = Negotiate(version=6, actions=ActionFlag.V2, protocol=ProtocolFlag.V2)

    with pytest.raises(LocalProtocolError, match=match) as info:
        session_options(offer, reply)

    assert info.value.command == "O"


def test_session_options_reply_version_above_lower_offer() -> None:
    with pytest.raises(LocalProtocolError, match="version 6"):
        session_options(POSTFIX_V2_OFFER, NegotiationReply(version=6))


# --- properties ----------------------------------------------------------------------------

flags32 = st.integers(min_value=0, max_value=0xFFFFFFFF)
known_actions = st.integers(min_value=0, max_value=int(ActionFlag.ALL)).map(ActionFlag)
known_protocol = st.integers(min_value=0, max_value=int(ProtocolFlag.ALL)).map(ProtocolFlag)
offers = st.builds(
    Negotiate,
    version=st.integers(min_value=0, max_value=10),
    actions=st.one_of(known_actions, flags32.map(ActionFlag)),
    protocol=st.one_of(
        known_protocol,
        st.tuples(known_protocol, st.sampled_from([0, *MDS_BITS])).map(
            lambda t: t[0] | ProtocolFlag(t[1])
        ),
        flags32.map(ProtocolFlag),
    ),
)
events_sets = st.frozensets(st.sampled_from(sorted(OPTIONAL_EVENTS)))
macro_names = st.sampled_from(["i", "j", "{client_addr}", "{auth_authen}", "{rcpt_addr}", "_"])


@st.composite
def requirements(draw: st.DrawFn) -> Requirements:
    actions = draw(known_actions)
    return Requirements(
        events=draw(events_sets),
        no_reply=draw(events_sets),
        actions=actions,
        # Only actions it also asks for: see test_negotiate_requests_required_actions.
        required_actions=draw(known_actions) & actions,
        required_protocol=draw(known_protocol),
        macros=draw(
            st.dictionaries(st.sampled_from(list(MacroStage)), st.lists(macro_names).map(tuple))
        ),
        leading_space=draw(st.booleans()),
        rejected_recipients=draw(st.booleans()),
        skip=draw(st.booleans()),
        max_data_size=draw(st.sampled_from([65535, 262143, 1048575])),
        version=draw(st.integers(min_value=2, max_value=6)),
    )


@given(offer=offers, needs=requirements())
def test_negotiate_reply_never_exceeds_offer(offer: Negotiate, needs: Requirements) -> None:
    offered_actions = offer.actions or ActionFlag.V1
    offered_protocol = offer.protocol or ProtocolFlag.V1
    feasible = (
        offer.version >= 2
        and not needs.required_actions & ~offered_actions
        and not needs.required_protocol & ~offered_protocol
    )
    if not feasible:
        with pytest.raises(NegotiationError) as info:
            negotiate(offer, needs)
        assert info.value.missing
        return
    reply = negotiate(offer, needs)

    assert 2 <= reply.version <= min(offer.version, needs.version)
    assert reply.actions & ~offered_actions == 0
    assert reply.protocol & ~offered_protocol == 0
    assert reply.protocol & ~(ProtocolFlag.ALL | (offered_protocol & MDS_BITS)) == 0
    assert needs.required_actions & ~reply.actions == 0
    assert needs.required_protocol & ~MDS_BITS & ~reply.protocol == 0
    for event, (no_flag, nr_flag) in EVENT_FLAGS.items():
        handled = event in needs.events
        suppressed = not handled and bool(offered_protocol & no_flag)
        assert bool(reply.protocol & no_flag) == (
            suppressed or bool(needs.required_protocol & no_flag)
        )
        silent = not handled or event in needs.no_reply
        assert bool(reply.protocol & nr_flag) == bool(
            (silent or needs.required_protocol & nr_flag) and offered_protocol & nr_flag
        )
    if reply.macros:
        assert reply.actions & ActionFlag.SETSYMLIST
        expected = dict(needs.macros)
        if MacroStage.EOM in expected:  # an EOM list always travels with an EOH list
            expected.setdefault(MacroStage.EOH, ())
        assert reply.macros == expected

    options = session_options(offer, reply)
    assert options.version == reply.version
    assert options.max_data_size <= needs.max_data_size


@pytest.mark.parametrize("version", [2, 3, 4, 6])
def test_suppressed_follows_the_flags_and_the_version(version: int) -> None:
    flags = ProtocolFlag.NOHDRS | ProtocolFlag.NOBODY
    options = SessionOptions(version=version, actions=ActionFlag.ALL, protocol=flags)
    assert options.suppressed("header")
    assert options.suppressed("body")
    assert not options.suppressed("envfrom")
    assert options.suppressed("unknown") == (version < 3)  # no U before version 3
    assert options.suppressed("data") == (version < 4)  # no DATA before version 4
    with pytest.raises(KeyError):
        options.suppressed("eom")  # type: ignore[arg-type]  # always sent
