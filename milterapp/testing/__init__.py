"""The testing kit: play the MTA against an App in memory, or against any milter over a socket.

Everything here goes through the real codec and state machines, the MTA side included, so a
test passes only if an MTA that follows the protocol would see the same thing.
"""

from milterapp.testing.sockets import Answer, MtaClient, ServerThread

__all__ = ["Answer", "MtaClient", "ServerThread"]
