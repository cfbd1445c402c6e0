"""The table of stages: consistent in itself, and with the Literal types written beside it."""

from __future__ import annotations

from typing import get_args

import pytest

from milterapp.constants import Command, MacroStage, ProtocolFlag
from milterapp.events import Macros
from milterapp.protocol.stages import (
    BY_COMMAND,
    BY_EVENT,
    BY_NAME,
    MESSAGE_STAGES,
    SEQUENCE,
    STAGES,
    EventName,
    MacroStageName,
    OptionalEvent,
    Stage,
)
from milterapp.replies import Continue, NegotiationReply


def test_literals_list_what_the_table_does() -> None:
    assert get_args(EventName) == tuple(stage.name for stage in STAGES)
    assert get_args(OptionalEvent) == tuple(stage.name for stage in STAGES if stage.optional)
    assert set(get_args(MacroStageName)) == {
        stage.name for stage in STAGES if stage.macros is not None
    }


def test_every_command_but_macros_carries_exactly_one_stage() -> None:
    commands = {command.value[0] for command in Command} - {Macros.command[0]}
    assert set(BY_COMMAND) == commands
    carried = [command for stage in STAGES for command in stage.commands]
    assert len(carried) == len(set(carried))


def test_names_aliases_and_models_are_unique() -> None:
    names = [name for stage in STAGES for name in (stage.name, *stage.aliases)]
    assert len(names) == len(set(names)) == len(BY_NAME)
    models = [event for stage in STAGES for event in stage.events]
    assert len(models) == len(set(models)) == len(BY_EVENT)


def test_each_macro_list_belongs_to_one_stage() -> None:
    stages = [stage.macros for stage in STAGES if stage.macros is not None]
    assert sorted(stages) == sorted(MacroStage)


def test_the_sequence_is_a_transaction_in_order() -> None:
    assert SEQUENCE == "CHMRTLNBE"
    assert "".join(stage.commands.decode() for stage in MESSAGE_STAGES) == "MRTLNBE"


@pytest.mark.parametrize("stage", STAGES, ids=lambda stage: stage.name)
def test_a_stage_is_consistent(stage: Stage) -> None:
    assert set(stage.goes_on) <= set(stage.replies)
    assert (stage.scope is None) == (not stage.goes_on and stage.name != "eom")
    if stage.observer:
        assert stage.replies in ((), (NegotiationReply,))
    else:
        assert Continue in stage.replies  # every command that gets a reply takes Continue
    # A stage the MTA can leave out can also go without its reply, and the reverse.
    assert (stage.suppress is ProtocolFlag.NONE) == (stage.no_reply is ProtocolFlag.NONE)
    assert stage.since >= 2
