"""Chaining: calling other (upstream) milters from an App, as an MTA calls them.

Its modules, lowest first (``tests/test_architecture.py`` holds them to this order):

    upstream    one conversation with one upstream milter: connect, negotiate, commands, deadlines

This ``__init__`` only re-exports.
"""

from milterapp.chain.upstream import (
    FailureKind,
    FailurePolicy,
    UpstreamConnection,
    UpstreamFailure,
    UpstreamOptions,
)

__all__ = [
    "FailureKind",
    "FailurePolicy",
    "UpstreamConnection",
    "UpstreamFailure",
    "UpstreamOptions",
]
