"""Each party of a chain is sent what its own connection to the MTA would bring it."""

from __future__ import annotations

from milterapp.chain.forwarding import for_party
from milterapp.constants import ActionFlag, ProtocolFlag
from milterapp.events import Body, Data, EnvRcpt, Header, Unknown
from milterapp.protocol.negotiation import SessionOptions


def options(protocol: ProtocolFlag = ProtocolFlag.NONE, version: int = 6) -> SessionOptions:
    return SessionOptions(version=version, actions=ActionFlag.NONE, protocol=protocol)


def test_an_event_the_party_declined_is_not_sent() -> None:
    no_body = options(ProtocolFlag.NOBODY)
    assert for_party(Body(chunk=b"hello\r\n"), no_body) is None
    assert for_party(Body(chunk=b"hello\r\n"), options()) == Body(chunk=b"hello\r\n")


def test_an_event_newer_than_the_partys_version_is_not_sent() -> None:
    assert for_party(Data(), options(version=2)) is None
    assert for_party(Unknown(line="HELP"), options(version=2)) is None
    assert for_party(Data(), options(version=6)) == Data()


def test_a_recipient_the_mta_refused_goes_only_to_parties_that_asked_to_see_them() -> None:
    recipient = EnvRcpt(address="<nobody@example.org>")
    assert for_party(recipient, options(), refused_by_mta=True) is None
    assert for_party(recipient, options(ProtocolFlag.RCPT_REJ), refused_by_mta=True) is recipient
    assert for_party(recipient, options()) is recipient


def test_a_header_loses_its_leading_space_for_a_party_that_did_not_ask_to_keep_it() -> None:
    spaced = Header(name="Subject", value=" hi", leading_space=True)
    assert for_party(spaced, options()) == Header(name="Subject", value="hi")
    assert for_party(spaced, options(ProtocolFlag.HDR_LEADSPC)) is spaced
    tabbed = Header(name="Subject", value="\thi", leading_space=True)
    assert for_party(tabbed, options()) == Header(name="Subject", value="\thi")  # (one space only)
    plain = Header(name="Subject", value="hi")
    assert for_party(plain, options()) is plain
