"""Chaining: calling other (upstream) milters from an App, as an MTA calls them.

Its modules, lowest first (``tests/test_architecture.py`` holds them to this order):

    headers     a message's header list as an MTA edits it (also the testing kit's model)
    negotiation one reply for the MTA from the negotiation replies of every party of a chain
    forwarding  what each party is sent of the MTA's commands: what its own connection brings
    referee     how the parties' verdicts combine, command by command, as an MTA's list does
    edits       the message the parties edit at end of message, and what goes to the MTA
    options     an upstream's settings (UpstreamOptions), and its failures by kind
    link        the socket under one upstream conversation (an asyncio protocol)
    upstream    one conversation with one upstream milter: connect, negotiate, commands, deadlines
    party       an upstream registered in an App: condition, back-off, connections kept
    session     one MTA connection's chain: every party, command by command

``App.use_milter()`` (milterapp/app.py) is how an app gets upstreams; docs/chaining.md
explains the whole.

This ``__init__`` only re-exports.
"""

from milterapp.chain.forwarding import for_party
from milterapp.chain.negotiation import Combined, combine, macros_for
from milterapp.chain.options import (
    FailureKind,
    FailurePolicy,
    UpstreamFailure,
    UpstreamOptions,
)
from milterapp.chain.party import UpstreamMilter
from milterapp.chain.referee import Referee
from milterapp.chain.session import ChainSession
from milterapp.chain.upstream import UpstreamConnection

__all__ = [
    "ChainSession",
    "Combined",
    "FailureKind",
    "FailurePolicy",
    "Referee",
    "UpstreamConnection",
    "UpstreamFailure",
    "UpstreamMilter",
    "UpstreamOptions",
    "combine",
    "for_party",
    "macros_for",
]
