"""The load generator behind ``milterapp bench``: many MTA connections against any milter.

    result      LoadOptions (what a run is asked to do) and LoadResult (what it measured)
    script      the packets of a session and of a message, prepared once per negotiation
    generator   the connections, in one or several processes, and the run itself

This ``__init__`` only re-exports.
"""

from milterapp.load.generator import run_load
from milterapp.load.result import LoadOptions, LoadResult

__all__ = ["LoadOptions", "LoadResult", "run_load"]
