"""One negotiation reply for a chain: every party gets what a direct connection gives it."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from milterapp.chain.negotiation import combine, macros_for
from milterapp.constants import ActionFlag, MacroStage, ProtocolFlag
from milterapp.events import Negotiate
from milterapp.protocol.mta import DEFAULT_OFFER
from milterapp.protocol.negotiation import (
    OPTIONAL_EVENTS,
    Requirements,
    negotiate,
    session_options,
)
from milterapp.replies import NegotiationReply

#: Every action, every protocol flag and both larger packet sizes, version 6.
OFFER = Negotiate(
    version=6,
    actions=ActionFlag.ALL,
    protocol=ProtocolFlag.ALL | ProtocolFlag.MDS_256K | ProtocolFlag.MDS_1M,
)

events = st.frozensets(st.sampled_from(sorted(OPTIONAL_EVENTS)))
requirements = st.builds(
    Requirements,
    events=events,
    no_reply=events,
    skip=st.booleans(),
    rejected_recipients=st.booleans(),
    leading_space=st.booleans(),
    macros=st.dictionaries(
        st.sampled_from(list(MacroStage)),
        st.lists(st.sampled_from(["i", "j", "{auth_authen}", "{daemon_name}"]), unique=True).map(
            tuple
        ),
        max_size=3,
    ),
)


def reply(**needs: object) -> NegotiationReply:
    """What a milterapp app with these needs answers ``OFFER``."""
    return negotiate(OFFER, Requirements(**needs))  # type: ignore[arg-type]


@given(requirements, st.integers(min_value=1, max_value=3))
def test_a_party_alone_or_repeated_gets_its_own_reply(needs: Requirements, copies: int) -> None:
    own = negotiate(OFFER, needs)
    combined = combine(OFFER, [own] * copies)
    assert combined.reply == own
    assert combined.unmet == {}


@given(st.lists(requirements, min_size=1, max_size=4), st.sampled_from([OFFER, DEFAULT_OFFER]))
def test_the_combined_reply_is_valid_and_takes_nothing_from_any_party(
    needs: list[Requirements], offer: Negotiate
) -> None:
    parties = [negotiate(offer, need) for need in needs]
    combined = combine(offer, parties).reply
    session = session_options(offer, combined)  # raises if the MTA would refuse it
    for party in parties:
        own = session_options(offer, party)
        # Every event a party receives comes; every reply it gives is waited for.
        assert session.suppressed_events <= own.suppressed_events
        assert own.replied_commands - session.replied_commands == frozenset()
        # (SETSYMLIST goes with a list: none is sent when a party asked for none.)
        assert party.actions & ~combined.actions & ~ActionFlag.SETSYMLIST == ActionFlag.NONE
        assert session.max_data_size <= own.max_data_size
    assert bool(combined.actions & ActionFlag.SETSYMLIST) == bool(combined.macros)


def test_an_event_is_declined_only_when_no_party_wants_it() -> None:
    eom_only = reply(events=frozenset())
    headers = reply(events=frozenset({"header"}))
    protocol = combine(OFFER, [eom_only, headers]).reply.protocol
    assert not protocol & ProtocolFlag.NOHDRS
    assert protocol & ProtocolFlag.NOBODY
    assert protocol & ProtocolFlag.NR_HDR == ProtocolFlag.NONE  # headers' party replies


def test_no_reply_is_asked_only_when_no_party_replies() -> None:
    watching = reply(events=frozenset({"header"}), no_reply=frozenset({"header"}))
    replying = reply(events=frozenset({"header"}))
    assert combine(OFFER, [watching, watching]).reply.protocol & ProtocolFlag.NR_HDR
    assert not combine(OFFER, [watching, replying]).reply.protocol & ProtocolFlag.NR_HDR


def test_features_of_one_party_are_asked_and_packet_sizes_only_as_far_as_all_go() -> None:
    plain = NegotiationReply(version=6, protocol=ProtocolFlag.NONE)
    keen = NegotiationReply(
        version=6,
        protocol=ProtocolFlag.SKIP
        | ProtocolFlag.RCPT_REJ
        | ProtocolFlag.HDR_LEADSPC
        | ProtocolFlag.MDS_1M,
    )
    big = NegotiationReply(version=6, protocol=ProtocolFlag.MDS_256K)
    both = combine(OFFER, [plain, keen]).reply.protocol
    for flag in (ProtocolFlag.SKIP, ProtocolFlag.RCPT_REJ, ProtocolFlag.HDR_LEADSPC):
        assert both & flag
    assert not both & (ProtocolFlag.MDS_256K | ProtocolFlag.MDS_1M)
    sizes = combine(OFFER, [keen, big]).reply.protocol
    assert sizes & (ProtocolFlag.MDS_256K | ProtocolFlag.MDS_1M) == ProtocolFlag.MDS_256K


def test_the_version_is_the_highest_a_party_speaks() -> None:
    old = NegotiationReply(version=2, actions=ActionFlag.ADDHDRS)
    new = NegotiationReply(version=6)
    combined = combine(OFFER, [old, new]).reply
    assert combined.version == 6
    assert combined.actions == ActionFlag.ADDHDRS


def test_macro_lists_are_joined_when_every_receiving_party_has_one() -> None:
    dkim = NegotiationReply(
        version=6,
        actions=ActionFlag.SETSYMLIST,
        macros={MacroStage.ENVFROM: ("{auth_authen}", "i")},
    )
    own = NegotiationReply(
        version=6,
        actions=ActionFlag.SETSYMLIST,
        macros={MacroStage.ENVFROM: ("i", "{mail_addr}")},
    )
    combined = combine(OFFER, [dkim, own])
    assert combined.reply.macros == {MacroStage.ENVFROM: ("{auth_authen}", "i", "{mail_addr}")}
    assert combined.reply.actions & ActionFlag.SETSYMLIST
    assert combined.unmet == {}


def test_a_stage_gets_no_list_when_a_receiving_party_asked_for_none() -> None:
    """The MTA's configured macros then go to everyone; what a list would have added is
    reported, for a warning."""
    listed = NegotiationReply(
        version=6, actions=ActionFlag.SETSYMLIST, macros={MacroStage.ENVFROM: ("i",)}
    )
    unlisted = NegotiationReply(version=6)  # as OpenDKIM: the MTA's configuration decides
    combined = combine(OFFER, [listed, unlisted])
    assert combined.reply.macros == {}
    assert not combined.reply.actions & ActionFlag.SETSYMLIST
    assert combined.unmet == {0: {MacroStage.ENVFROM: ("i",)}}


def test_a_party_that_declines_the_stage_does_not_stop_its_list() -> None:
    listed = NegotiationReply(
        version=6, actions=ActionFlag.SETSYMLIST, macros={MacroStage.ENVFROM: ("i",)}
    )
    no_mail = NegotiationReply(version=6, protocol=ProtocolFlag.NOMAIL)
    assert combine(OFFER, [listed, no_mail]).reply.macros == {MacroStage.ENVFROM: ("i",)}


def test_each_party_is_given_the_macros_it_asked_for() -> None:
    values = {"i": "4F2A1C", "{auth_authen}": "alice", "{daemon_name}": "mx"}
    dkim = NegotiationReply(version=6, macros={MacroStage.ENVFROM: ("auth_authen",)})
    assert macros_for(dkim, MacroStage.ENVFROM, values) == {"{auth_authen}": "alice"}
    assert macros_for(dkim, MacroStage.HELO, values) == values  # no list there: all


def test_a_chain_without_parties_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one party"):
        combine(OFFER, [])
