"""examples/add_header.py: every message is stamped with the MTA's host name (macro ``j``)."""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

from milterapp import AddHeader
from milterapp.testing import POSTFIX, MilterTestClient, SessionFacts

MESSAGE = b"From: a@example.org\r\nTo: b@example.net\r\nSubject: hi\r\n\r\nHello.\r\n"


def test_add_header_stamps_with_the_mta_host_name(
    load_example: Callable[[str], ModuleType],
) -> None:
    example = load_example("add_header")
    facts = SessionFacts(hostname="mx1.example.net")
    with MilterTestClient(example.app, facts=facts) as client:
        result = client.send_message(MESSAGE)
    assert result.accepted
    assert result.modifications == [
        AddHeader(name="X-Filtered-By", value="add-header on mx1.example.net")
    ]
    assert result.delivered is not None
    assert result.delivered.header("X-Filtered-By") == "add-header on mx1.example.net"
    assert result.delivered.header("Subject") == "hi"
    assert result.delivered.body == b"Hello.\r\n"


def test_add_header_stamps_under_sendmail_too(load_example: Callable[[str], ModuleType]) -> None:
    example = load_example("add_header")
    facts = SessionFacts(hostname="relay.example.com")
    with MilterTestClient(example.app, mta="sendmail", facts=facts) as client:
        result = client.send_message(MESSAGE)
    assert result.delivered is not None
    assert result.delivered.headers_named("X-Filtered-By") == ["add-header on relay.example.com"]


def test_add_header_stamps_every_message_of_a_connection_once(
    load_example: Callable[[str], ModuleType],
) -> None:
    example = load_example("add_header")
    with MilterTestClient(example.app) as client:
        results = [client.send_message(MESSAGE) for _ in range(3)]
    for result in results:
        assert result.delivered is not None
        assert result.delivered.headers_named("X-Filtered-By") == ["add-header on mx.example.net"]


def test_add_header_without_the_host_name_macro_says_this_host(
    load_example: Callable[[str], ModuleType],
) -> None:
    example = load_example("add_header")
    # An MTA configured not to send j at connect (Postfix: milter_connect_macros without j).
    no_j = POSTFIX.model_copy(
        update={"macros": {**POSTFIX.macros, "C": ("{daemon_name}", "{daemon_addr}", "v", "_")}}
    )
    with MilterTestClient(example.app, mta=no_j) as client:
        result = client.send_message(MESSAGE)
    assert result.delivered is not None
    assert result.delivered.header("X-Filtered-By") == "add-header on this host"
