"""App.requirements(): what the App asks the MTA for, derived from handlers and options."""

from __future__ import annotations

from typing import Any

import pytest

from milterapp.app import App
from milterapp.constants import ActionFlag, MacroStage
from milterapp.context import KEPT_EVENTS, RECORDED_EVENTS
from milterapp.events import Event
from milterapp.handlers import EVENT_NAMES
from milterapp.protocol.negotiation import OPTIONAL_EVENTS, Requirements

OBSERVERS_AND_EOM = ("negotiate", "open", "abort", "close", "eom")
#: Asked for always, for the context's facts: client, HELO name, sender, recipients.
RECORDED = frozenset({"connect", "helo", "envfrom", "envrcpt"})
KEPT = RECORDED | {"header", "body"}


def handler(event: Event) -> None:
    return None


def app_with(*names: str, **options: Any) -> App:
    app = App("t", **options)
    for name in names:
        app.add_handler(name, handler)
    return app


def test_optional_events_and_event_names_agree() -> None:
    assert set(OPTIONAL_EVENTS) | set(OBSERVERS_AND_EOM) == set(EVENT_NAMES)
    assert not set(OPTIONAL_EVENTS) & set(OBSERVERS_AND_EOM)


def test_recorded_events_are_the_contexts() -> None:
    assert RECORDED == RECORDED_EVENTS
    assert KEPT == RECORDED_EVENTS | KEPT_EVENTS


def test_no_handlers() -> None:
    needs = App("t").requirements()
    assert isinstance(needs, Requirements)
    # The context's facts are asked for anyway, without waiting for replies.
    assert needs.events == RECORDED
    assert needs.no_reply == RECORDED
    assert needs.skip is False
    assert needs.macros == {}
    assert needs.leading_space is False
    assert needs.rejected_recipients is False


@pytest.mark.parametrize("name", sorted(OPTIONAL_EVENTS))
def test_one_optional_event(name: str) -> None:
    needs = app_with(name).requirements()
    assert needs.events == RECORDED | {name}
    assert needs.no_reply == RECORDED - {name}


@pytest.mark.parametrize("name", OBSERVERS_AND_EOM)
def test_events_that_always_come_add_nothing(name: str) -> None:
    needs = app_with(name).requirements()
    assert needs.events == RECORDED
    assert needs.skip is False


def test_aliases_count_as_their_event() -> None:
    needs = app_with("envelope-from", "envelope-recipient", "end-of-headers").requirements()
    assert needs.events == RECORDED | {"eoh"}
    assert needs.no_reply == {"connect", "helo"}


def test_handled_events_only() -> None:
    needs = app_with("connect", "envrcpt", "eom", "close", "open").requirements()
    assert needs.events == RECORDED
    assert needs.no_reply == {"helo", "envfrom"}


def test_all_handlers() -> None:
    needs = app_with(*EVENT_NAMES).requirements()
    assert needs.events == OPTIONAL_EVENTS
    assert needs.skip is True


def test_no_reply_is_intersected_with_handled_events() -> None:
    app = app_with("connect", "header", "eom", no_reply={"header", "helo", "body"})
    needs = app.requirements()
    assert needs.events == RECORDED | {"header"}
    assert needs.no_reply == {"header", "helo", "envfrom", "envrcpt"}


def test_no_reply_of_unhandled_events_only_adds_nothing() -> None:
    needs = app_with("eom", no_reply={"connect", "helo", "header"}).requirements()
    assert needs.events == RECORDED
    assert needs.no_reply == RECORDED


def test_keep_message_without_handlers() -> None:
    needs = App("t", keep_message=True).requirements()
    assert needs.events == KEPT
    assert needs.no_reply == KEPT  # nobody answers them: the MTA need not wait
    assert needs.skip is False  # the whole body must come


def test_keep_message_with_some_handlers() -> None:
    needs = app_with("envrcpt", "body", "helo", keep_message=True).requirements()
    assert needs.events == KEPT
    assert needs.no_reply == {"connect", "envfrom", "header"}


def test_keep_message_and_no_reply() -> None:
    app = app_with("envrcpt", "eoh", keep_message=True, no_reply={"envrcpt"})
    needs = app.requirements()
    assert needs.events == KEPT | {"eoh"}
    assert needs.no_reply == {"connect", "helo", "envfrom", "envrcpt", "header", "body"}


def test_actions_default_requests_all_but_setsymlist_and_requires_none() -> None:
    needs = App("t").requirements()
    assert needs.actions == ActionFlag.ALL & ~ActionFlag.SETSYMLIST
    assert not needs.actions & ActionFlag.SETSYMLIST
    for flag in (
        ActionFlag.ADDHDRS,
        ActionFlag.CHGBODY,
        ActionFlag.ADDRCPT,
        ActionFlag.DELRCPT,
        ActionFlag.CHGHDRS,
        ActionFlag.QUARANTINE,
        ActionFlag.CHGFROM,
        ActionFlag.ADDRCPT_PAR,
    ):
        assert needs.actions & flag
    assert needs.required_actions == ActionFlag.NONE


@pytest.mark.parametrize(
    "actions",
    [
        ActionFlag.ADDHDRS,
        ActionFlag.ADDHDRS | ActionFlag.CHGHDRS,
        ActionFlag.CHGFROM | ActionFlag.ADDRCPT | ActionFlag.DELRCPT,
        ActionFlag.QUARANTINE,
    ],
)
def test_explicit_actions_are_requested_and_required(actions: ActionFlag) -> None:
    needs = App("t", actions=actions).requirements()
    assert needs.actions == actions
    assert needs.required_actions == actions


def test_no_actions_at_all() -> None:
    needs = App("t", actions=ActionFlag.NONE).requirements()
    assert needs.actions == ActionFlag.NONE
    assert needs.required_actions == ActionFlag.NONE


def test_macros_by_stage_name() -> None:
    macros = {
        "connect": ["{client_addr}", "j"],
        "helo": ["{tls_version}"],
        "envfrom": ["{auth_authen}", "i"],
        "envrcpt": ["{rcpt_addr}"],
        "data": ["i"],
        "eoh": ["{msg_id}"],
        "eom": ["i", "{mail_addr}"],
    }
    needs = App("t", macros=macros).requirements()
    assert needs.macros == {
        MacroStage.CONNECT: ("{client_addr}", "j"),
        MacroStage.HELO: ("{tls_version}",),
        MacroStage.ENVFROM: ("{auth_authen}", "i"),
        MacroStage.ENVRCPT: ("{rcpt_addr}",),
        MacroStage.DATA: ("i",),
        MacroStage.EOH: ("{msg_id}",),
        MacroStage.EOM: ("i", "{mail_addr}"),
    }
    # Note the wire numbering: end of message is 5, end of headers 6.
    assert MacroStage.EOM == 5
    assert MacroStage.EOH == 6


def test_empty_macro_list_asks_for_none() -> None:
    needs = App("t", macros={"connect": []}).requirements()
    assert needs.macros == {MacroStage.CONNECT: ()}


def test_skip_only_with_a_body_handler() -> None:
    assert app_with("body").requirements().skip is True
    assert app_with("header", "eoh", "eom").requirements().skip is False


@pytest.mark.parametrize("leading_space", [False, True])
@pytest.mark.parametrize("rejected_recipients", [False, True])
def test_flags_are_passed_through(leading_space: bool, rejected_recipients: bool) -> None:
    app = App("t", leading_space=leading_space, rejected_recipients=rejected_recipients)
    needs = app.requirements()
    assert needs.leading_space is leading_space
    assert needs.rejected_recipients is rejected_recipients


def test_requirements_reflect_handlers_added_later() -> None:
    app = App("t")
    assert app.requirements().no_reply == RECORDED
    app.add_handler("helo", handler)
    app.add_handler("data", handler)
    assert app.requirements().events == RECORDED | {"data"}
    assert app.requirements().no_reply == RECORDED - {"helo"}
