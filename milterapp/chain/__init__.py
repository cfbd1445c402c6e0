"""Chaining: calling other (upstream) milters from an App, as an MTA calls them.

Its modules, lowest first (``tests/test_architecture.py`` holds them to this order):

    negotiation one reply for the MTA from the negotiation replies of every party of a chain
    forwarding  what each party is sent of the MTA's commands: what its own connection brings
    referee     how the parties' verdicts combine, command by command, as an MTA's list does
    upstream    one conversation with one upstream milter: connect, negotiate, commands, deadlines

This ``__init__`` only re-exports.
"""

from milterapp.chain.forwarding import for_party
from milterapp.chain.negotiation import Combined, combine, macros_for
from milterapp.chain.referee import Referee
from milterapp.chain.upstream import (
    FailureKind,
    FailurePolicy,
    UpstreamConnection,
    UpstreamFailure,
    UpstreamOptions,
)

__all__ = [
    "Combined",
    "FailureKind",
    "FailurePolicy",
    "Referee",
    "UpstreamConnection",
    "UpstreamFailure",
    "UpstreamOptions",
    "combine",
    "for_party",
    "macros_for",
]
