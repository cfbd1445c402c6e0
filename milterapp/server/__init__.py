"""Serving milters over sockets: everything between the listening socket and the app.

It serves any :class:`~milterapp.server.servable.Servable` (an App) and never imports the app
layer. Its modules, lowest first (``tests/test_architecture.py`` holds them to this order):

    servable    what the server serves (the Servable protocol) and the Serving handle
    limits      what one connection may cost, and the replies when a limit is hit
    writes      replies written in one batch per loop turn, without Nagle's delay
    loops       which event loop runs (uvloop when installed, or asyncio's)
    logfmt      key=value lines as structlog's processors write them, for less
    logsetup    logging set-up for scripts (the library itself never configures logging)
    acceptor    accepting connections on the listening socket, on either loop
    outcomes    the administrator's log: a line per message, per connection, per event
    notify      systemd's notify protocol: ready, reloading, stopping, watchdog
    check       the health check: negotiate with a milter as an MTA would, and quit
    metrics     Prometheus metrics and /healthz (--metrics), summed over workers
    options     ServerOptions: every option of the server, holding the Limits
    deadlines   the idle, per-command and write deadlines of one connection, as timers
    responder   every reply of a connection, and its record of the session
    listener    the listening socket: given, systemd's, or opened for the spec
    connection  one MTA connection: bytes in, events to the responder, bytes out, its end
    server      MilterServer and serve(): one socket, its connections, graceful shutdown
    workers     several processes serving one socket (Linux)
    arguments   the server's options on a command line, and their errors in one line
    main        run(): serving from a script or the command line

This ``__init__`` only re-exports.
"""

from milterapp.server.limits import Limits
from milterapp.server.main import run
from milterapp.server.options import ServerOptions
from milterapp.server.servable import Servable, Serving
from milterapp.server.server import MilterServer, serve

__all__ = ["Limits", "MilterServer", "Servable", "ServerOptions", "Serving", "run", "serve"]
