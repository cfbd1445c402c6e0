"""One negotiation reply for the MTA, from the replies of every party of a chain.

A chain answers the MTA once for the app's own handlers and every upstream milter, each of
which negotiated the same offer on its own. :func:`combine` is the reply that gives every
party what it would get on a direct connection, or, where no single reply can, the nearest
that never takes from a party something it asked for:

- **Events**: the MTA is asked not to send an event only when no party wants it.
- **Replies**: the MTA is told not to wait for a reply only when no party replies to it
  (each party either declined the event or negotiated no reply to it).
- **Actions**: every action some party may use (all were offered, so all may be asked).
- **Features**: ``SKIP``, ``RCPT_REJ`` and ``HDR_LEADSPC`` when some party asked (the chain
  answers ``SKIP`` for the others, hides rejected recipients from those that did not ask,
  and strips the leading space for those that did not ask for it); the larger packet sizes
  (``MDS_256K``, ``MDS_1M``) only as far as every party asked, so that no party is sent a
  body chunk larger than it agreed to.
- **Version**: the highest a party speaks; a party that speaks an older one is not sent the
  events its version lacks (as the MTA would not).
- **Macros**: a stage gets a list only when every party that receives that stage asked for
  one; the list is their union, and each party is then given the macros it asked for. If a
  party asked for none at a stage, the MTA's own configuration decides what comes (Postfix's
  ``milter_*_macros``, Sendmail's ``Milter.macros.*``), for everyone: a list would take from
  that party what the MTA's configuration gives it (OpenDKIM, for one, reads
  ``{daemon_name}`` and ``{auth_authen}`` from there). What others then asked for in vain is
  in :attr:`Combined.unmet`, for a warning.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from milterapp.constants import ActionFlag, MacroStage, ProtocolFlag, max_data_size_for
from milterapp.events import Negotiate
from milterapp.protocol.stages import STAGES, Stage
from milterapp.replies import NegotiationReply

__all__ = ["Combined", "combine", "macros_for"]

_OPTIONAL: Final = tuple(stage for stage in STAGES if stage.optional)
#: Features one party's wish is enough for: the chain makes up the difference for the others.
_ANY_PARTY: Final = ProtocolFlag.SKIP | ProtocolFlag.RCPT_REJ | ProtocolFlag.HDR_LEADSPC
_MDS_FLAGS: Final = (ProtocolFlag.MDS_256K, ProtocolFlag.MDS_1M)
#: The optional stage each macro stage's list goes with (end of message, always sent, has none).
_MACRO_STAGES: Final = {
    stage.macros: stage for stage in STAGES if stage.macros is not None and stage.optional
}


@dataclass(frozen=True)
class Combined:
    """The reply for the MTA, and what it could not give.

    Attributes:
        reply: the negotiation reply to send to the MTA.
        unmet: by party (its index in the list given to :func:`combine`), the macro names it
            asked for at a stage that gets no list (another party asked for none there).
    """

    reply: NegotiationReply
    unmet: dict[int, dict[MacroStage, tuple[str, ...]]]


def _receives(party: NegotiationReply, stage: Stage) -> bool:
    """Whether the MTA would send ``stage`` to ``party`` on a direct connection."""
    return not party.protocol & stage.suppress and party.version >= stage.since


def combine(offer: Negotiate, parties: Sequence[NegotiationReply]) -> Combined:
    """The reply to ``offer`` for a chain whose parties answered it with ``parties`` (each
    valid for ``offer``; the app's own reply is one of them).

    Raises:
        ValueError: no party.
    """
    if not parties:
        raise ValueError("a chain needs at least one party")
    protocol = ProtocolFlag.NONE
    for stage in _OPTIONAL:
        receiving = [party for party in parties if _receives(party, stage)]
        if not receiving:
            protocol |= stage.suppress
        if stage.no_reply and all(party.protocol & stage.no_reply for party in receiving):
            protocol |= stage.no_reply
    for party in parties:
        protocol |= party.protocol & _ANY_PARTY
    # The largest packet every party agreed to (a party that asked for 1 MiB takes 256 KiB).
    smallest = min(max_data_size_for(party.protocol) for party in parties)
    protocol |= next(
        (flag for flag in _MDS_FLAGS if max_data_size_for(flag) == smallest), ProtocolFlag.NONE
    )
    # Each party's flags were offered; a flag set because no party receives an event may not
    # have been (nobody asked for it): only what the MTA offered goes back.
    protocol &= offer.protocol or ProtocolFlag.V1

    actions = ActionFlag.NONE
    for party in parties:
        actions |= party.actions
    macros, unmet = _macros(parties)
    if macros:
        actions |= ActionFlag.SETSYMLIST
    else:
        actions &= ~ActionFlag.SETSYMLIST
    reply = NegotiationReply(
        version=max(party.version for party in parties),
        actions=actions,
        protocol=protocol,
        macros=macros,
    )
    return Combined(reply=reply, unmet=unmet)


def _macros(
    parties: Sequence[NegotiationReply],
) -> tuple[dict[MacroStage, tuple[str, ...]], dict[int, dict[MacroStage, tuple[str, ...]]]]:
    asked: dict[MacroStage, tuple[str, ...]] = {}
    unmet: dict[int, dict[MacroStage, tuple[str, ...]]] = {}
    stages = {stage for party in parties for stage in party.macros}
    for macro_stage in sorted(stages):
        stage = _MACRO_STAGES.get(macro_stage)
        # (A party that asked for a list counts even if it declined the stage's event.)
        receiving = [
            (at, party)
            for at, party in enumerate(parties)
            if stage is None or macro_stage in party.macros or _receives(party, stage)
        ]
        if all(macro_stage in party.macros for _, party in receiving):
            names: dict[str, None] = {}
            for _, party in receiving:
                names.update(dict.fromkeys(party.macros[macro_stage]))
            asked[macro_stage] = tuple(names)
        else:
            for at, party in receiving:
                if party.macros.get(macro_stage):
                    unmet.setdefault(at, {})[macro_stage] = party.macros[macro_stage]
    return asked, unmet


def macros_for(
    party: NegotiationReply, stage: MacroStage, values: dict[str, str]
) -> dict[str, str]:
    """The macros of ``stage`` to hand on to ``party``: those it asked for (with or without
    braces), or all of them if it asked for none at that stage."""
    names = party.macros.get(stage)
    if names is None:
        return values
    wanted = {name.strip("{}") for name in names}
    return {name: value for name, value in values.items() if name.strip("{}") in wanted}
