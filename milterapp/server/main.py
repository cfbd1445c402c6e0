"""Serving from a script or the command line: ``app.run()`` and ``milterapp run``.

:func:`run` is milter-client's main loop in one call: it sets up logging, picks the event
loop, serves in this process or in forked workers until SIGTERM or SIGINT, and turns a setup
problem (a bad spec or option, an address in use, a failing startup hook) into one line on
stderr and exit status 1.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from pydantic import ValidationError

from milterapp.errors import MilterError
from milterapp.server.logsetup import LogFormat, configure_logging
from milterapp.server.loops import loop_factory, run_in_loop
from milterapp.server.options import ServerOptions
from milterapp.server.servable import Servable
from milterapp.server.server import serve
from milterapp.server.workers import run_workers
from milterapp.spec import ConnectionSpec

__all__ = ["run"]


def _one_line(exc: ValidationError) -> str:
    # A limit given by name is validated inside ``limits``: name it as it was given.
    return "; ".join(
        f"{'.'.join(str(part) for part in _given(error['loc'])) or 'options'}: {error['msg']}"
        for error in exc.errors()
    )


def _given(loc: tuple[int | str, ...]) -> tuple[int | str, ...]:
    return loc[1:] if loc[:1] == ("limits",) and len(loc) > 1 else loc


def _spec_from_argv(argv: list[str]) -> str | None:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--spec")
    known, _ = parser.parse_known_args(argv)
    spec: str | None = known.spec
    return spec


def run(
    app: Servable,
    spec: str | ConnectionSpec | None = None,
    *,
    workers: int = 1,
    log_format: LogFormat = "text",
    log_level: str = "INFO",
    loop: str = "auto",
    **options: Any,
) -> None:
    """Serve ``app`` until SIGTERM or SIGINT; for scripts.

    ``spec`` defaults to ``--spec`` on the command line, then ``$MILTERAPP_SPEC``, then the
    loopback default. Configures logging (key=value on stderr, or JSON). A setup problem
    (bad spec, address in use, failing startup hook) is one line on stderr and exit code 1.
    ``workers`` above 1 forks that many processes to serve the socket (Linux; see
    :mod:`milterapp.server.workers`). ``loop`` picks the event loop: ``auto`` (uvloop when
    installed), ``asyncio`` or ``uvloop`` (see :mod:`milterapp.server.loops`).
    """
    configure_logging(log_format, log_level)
    spec = spec or _spec_from_argv(sys.argv[1:]) or os.environ.get("MILTERAPP_SPEC") or None
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        message = f"workers: must be a whole number, at least 1 (not {workers!r})"
        print(f"milterapp: error: invalid option: {message}", file=sys.stderr)
        raise SystemExit(1)
    try:
        loop_factory(loop)  # an unknown loop, or uvloop missing: fail before anything starts
        if workers == 1:
            run_in_loop(serve(app, spec, handle_signals=True, **options), loop)
            return
        server_options = ServerOptions.from_spec(spec, **options)
        status = run_workers(app, server_options, workers, loop=loop)
    except MilterError as exc:
        print(f"milterapp: error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    except ValidationError as exc:  # pydantic validation of the options
        print(f"milterapp: error: invalid option: {_one_line(exc)}", file=sys.stderr)
        raise SystemExit(1) from None
    if status:
        raise SystemExit(status)
