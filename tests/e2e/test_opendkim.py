"""End to end: the private OpenDKIM fixture signs, and dkimpy checks its signatures.

The testing kit plays Postfix against OpenDKIM over a real socket; the message is rebuilt
as Postfix would deliver it and checked with the fixture's key (no DNS).
"""

from __future__ import annotations

import pytest

from milterapp.replies import InsertHeader
from milterapp.testing import POSTFIX, DeliveredMessage, MessageResult, MilterTestClient
from milterapp.testing.delivery import apply, parse_message
from tests.e2e.common import SENDER, message
from tests.e2e.opendkim import OpenDkim

RECIPIENT = "rcpt@example.org"


def sign(
    opendkim: OpenDkim, data: bytes, *, client_address: str = "127.0.0.1"
) -> tuple[MessageResult, DeliveredMessage]:
    """Send ``data`` to OpenDKIM as Postfix would; return the result and the delivery."""
    with MilterTestClient(target=opendkim.spec, mta="postfix", timeout=30) as client:
        result = client.send_message(
            data, sender=SENDER, recipients=RECIPIENT, client_address=client_address
        )
        options = client.mta.options
    assert options is not None
    # OpenDKIM negotiates HDR_LEADSPC: its header values carry the space after the colon.
    # The delivery is rebuilt with that convention, which result.delivered does not apply.
    headers, body = parse_message(data)
    delivered = apply(
        result.modifications,
        sender=SENDER,
        recipients=[RECIPIENT],
        headers=headers,
        body=body,
        profile=POSTFIX,
        leading_space=options.leading_space,
    )
    return result, delivered


@pytest.mark.parametrize("opendkim", ["inet", "unix"], indirect=True)
def test_opendkim_signature_verifies_and_catches_changes(opendkim: OpenDkim) -> None:
    result, delivered = sign(opendkim, message("signed", body="Signed body.\r\n"))

    [signature] = result.modifications
    assert isinstance(signature, InsertHeader)
    assert (signature.name, signature.index) == ("DKIM-Signature", 0)
    assert signature.value.startswith(" v=1;")  # HDR_LEADSPC: the space is OpenDKIM's
    assert f"d={opendkim.domain};" in signature.value
    assert f"s={opendkim.selector};" in signature.value
    raw = delivered.as_bytes()
    assert raw.startswith(b"DKIM-Signature: v=1;")
    assert opendkim.verify(raw)
    # The check can fail: a changed body or signed header breaks the signature.
    assert not opendkim.verify(raw.replace(b"Signed body.", b"Signed body!"))
    assert not opendkim.verify(raw.replace(b"Subject: signed", b"Subject: changed"))


def test_opendkim_leaves_other_domains_unsigned(opendkim: OpenDkim) -> None:
    data = b"From: someone@other.example\r\nSubject: foreign\r\n\r\nNot ours.\r\n"

    result, delivered = sign(opendkim, data)

    assert result.accepted
    assert result.modifications == []
    assert delivered.headers_named("DKIM-Signature") == []
    assert not opendkim.verify(delivered.as_bytes())


def test_opendkim_leaves_external_clients_unsigned(opendkim: OpenDkim) -> None:
    # InternalHosts is loopback: mail from other clients is not the signer's to sign.
    result, delivered = sign(opendkim, message("external"), client_address="192.0.2.10")

    assert result.accepted
    assert result.modifications == []
    assert delivered.headers_named("DKIM-Signature") == []
