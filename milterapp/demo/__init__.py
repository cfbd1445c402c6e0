"""``milterapp demo``: a milter at work, with nothing to set up.

    live    a real milter served on a temporary unix socket, three messages through it
    wire    the protocol core packet by packet, without sockets (``--wire``)

This ``__init__`` only re-exports.
"""

from milterapp.demo.live import run_demo
from milterapp.demo.wire import run_wire_demo

__all__ = ["run_demo", "run_wire_demo"]
