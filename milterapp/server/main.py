"""Serving from a script or the command line: ``app.run()`` and ``milterapp run``.

:func:`run` is milter-client's main loop in one call: it reads the server options on the
command line (those of ``milterapp run``, from :mod:`milterapp.server.arguments`), sets up
logging, picks the event loop, serves in this process or in forked workers until SIGTERM or
SIGINT, and turns a setup problem (a bad spec or option, an address in use, a failing startup
hook) into one line on stderr and exit status 1.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from pydantic import ValidationError

from milterapp.errors import MilterError
from milterapp.server.arguments import describe, parse_command_line, settle
from milterapp.server.logsetup import configure_logging
from milterapp.server.loops import loop_factory, run_in_loop
from milterapp.server.metrics import Metrics, MetricsEndpoint, require_prometheus
from milterapp.server.options import ServerOptions
from milterapp.server.servable import Servable
from milterapp.server.server import serve
from milterapp.spec import ConnectionSpec

__all__ = ["run"]


def _fail(message: str) -> NoReturn:
    print(f"milterapp: error: {message}", file=sys.stderr)
    raise SystemExit(1)


def _serve_one(
    app: Servable,
    spec: str | ConnectionSpec | None,
    metrics_address: str | None,
    loop: Any,
    server_options: dict[str, Any],
) -> None:
    """Serve in this process, with the metrics endpoint if asked for."""
    if not metrics_address:
        run_in_loop(serve(app, spec, handle_signals=True, **server_options), loop)
        return
    metrics = Metrics()
    endpoint = MetricsEndpoint(
        metrics_address,
        metrics.registry,
        lambda: metrics.accepting,
        before_scrape=metrics.flush_from_any_thread,
    )
    try:
        run_in_loop(serve(app, spec, handle_signals=True, metrics=metrics, **server_options), loop)
    finally:
        endpoint.close()


def run(
    app: Servable,
    spec: str | ConnectionSpec | None = None,
    *,
    argv: Sequence[str] | None = None,
    **options: Any,
) -> None:
    """Serve ``app`` until SIGTERM or SIGINT; for scripts.

    The command line (``argv``, by default ``sys.argv[1:]``) takes the options of
    ``milterapp run`` and overrides what the script passes: ``--help`` lists them and exits,
    an unknown or bad one is one line on stderr and exit status 2. Pass ``argv=[]`` when the
    command line is not the milter's (a test, a script with arguments of its own).

    ``spec`` is ``--spec`` if given, else this argument, else ``$MILTERAPP_SPEC``, else the
    loopback default. ``options`` are those of
    :class:`~milterapp.server.options.ServerOptions` (the limits by name) and of
    :class:`~milterapp.server.options.RunOptions`: ``workers`` above 1 forks that many
    processes (Linux; :mod:`milterapp.server.workers`), ``loop`` picks the event loop
    (:mod:`milterapp.server.loops`), ``log_format`` and ``log_level`` set up logging. A setup
    problem (a bad spec or option, an address in use, a failing startup hook) is one line on
    stderr and exit status 1.
    """
    description = f"Serve the milter {app.name!r} until SIGTERM or SIGINT."
    given = parse_command_line(sys.argv[1:] if argv is None else argv, description)
    spec = given.pop("spec", None) or spec or os.environ.get("MILTERAPP_SPEC") or None
    try:
        settings, server_options = settle(options, given)
        configure_logging(settings.log_format, settings.log_level, syslog=settings.syslog)
        loop_factory(settings.loop)  # an unknown loop, or uvloop missing: fail before anything
        if settings.metrics:
            require_prometheus()
        if settings.workers == 1:
            _serve_one(app, spec, settings.metrics, settings.loop, server_options)
            return
        from milterapp.server.workers import run_workers  # forks: --workers above 1 only

        server = ServerOptions.from_spec(spec, **server_options)
        status = run_workers(
            app, server, settings.workers, loop=settings.loop, metrics=settings.metrics
        )
    except MilterError as exc:
        _fail(str(exc))
    except ValidationError as exc:  # pydantic validation of options given in code
        _fail(f"invalid option: {describe(exc)}")
    if status:
        raise SystemExit(status)
