"""What each party of a chain is sent of the MTA's commands: what a direct connection gives it.

The MTA speaks to the chain with the options :func:`~milterapp.chain.negotiation.combine`
agreed, which grant every party's wishes at once: so it may send what one party declined, a
recipient it refused itself (``RCPT_REJ``) or header values with their leading space
(``HDR_LEADSPC``). :func:`for_party` turns each command into what one party asked for, as
the MTA would have sent it on that party's own connection.
"""

from __future__ import annotations

from milterapp.constants import ProtocolFlag
from milterapp.events import EnvRcpt, Event, Header
from milterapp.protocol.negotiation import SessionOptions
from milterapp.protocol.stages import BY_EVENT

__all__ = ["for_party"]


def for_party(event: Event, party: SessionOptions, *, refused_by_mta: bool = False) -> Event | None:
    """``event`` as ``party`` gets it, or None when it would not get it at all.

    ``refused_by_mta``: ``event`` is a recipient the MTA refused itself (shown because a party
    asked for ``RCPT_REJ``; the MTA marks it with the macro ``{rcpt_mailer}`` = ``error``).
    """
    stage = BY_EVENT.get(type(event))
    if stage is not None and stage.name in party.suppressed_events:
        return None
    if isinstance(event, EnvRcpt):
        if refused_by_mta and not party.protocol & ProtocolFlag.RCPT_REJ:
            return None
    elif isinstance(event, Header) and event.leading_space and not party.leading_space:
        # Without HDR_LEADSPC both MTAs remove exactly one leading space (not a tab).
        return Header(name=event.name, value=event.value.removeprefix(" "))
    return event
