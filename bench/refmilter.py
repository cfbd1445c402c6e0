"""The reference milter of the benchmarks, written with milterapp.

A plain handler on every event that lets the message go on; at end of message it adds a
header and accepts. ``--eom-only`` keeps only the end-of-message handler, so that the MTA
skips every other event. Run: ``python bench/refmilter.py SPEC [--eom-only] [--loop L]``.
"""

from __future__ import annotations

import argparse
import inspect
from typing import Any

from milterapp import Accept, App


def build(*, eom_only: bool = False) -> App:
    app = App("refmilter")
    if not eom_only:
        for name in ("connect", "helo", "envfrom", "envrcpt", "data", "header", "eoh", "body"):

            def go_on(event: Any, ctx: Any) -> None:
                return None

            app.on(name)(go_on)  # type: ignore[call-overload]

    @app.on("eom")
    def stamp(event: Any, ctx: Any) -> Accept:
        ctx.add_header("X-Bench", "yes")
        return Accept()

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("spec")
    parser.add_argument("--eom-only", action="store_true")
    parser.add_argument("--loop", default="auto")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--log-level", default="WARNING", help="INFO: a line per message")
    parser.add_argument("--metrics", help="HOST:PORT: Prometheus metrics on")
    args = parser.parse_args()
    app = build(eom_only=args.eom_only)
    options: dict[str, Any] = {
        "loop": args.loop,
        "workers": args.workers,
        "log_level": args.log_level,
    }
    if args.metrics:
        options["metrics"] = args.metrics
    if "argv" in inspect.signature(app.run).parameters:
        options["argv"] = []  # the command line is this script's, parsed above
    # (else a build from before run() parsed the command line: compare.py measures those too)
    app.run(args.spec, **options)


if __name__ == "__main__":
    main()
