"""The ``milterapp`` command line (also ``python -m milterapp``).

Commands: ``run`` serves an App from a module; ``send`` plays an MTA against any running
milter with a message file; ``bench`` loads a running milter as Postfix would and measures it;
``demo`` shows a milter at work; ``record`` records what an MTA and a milter say to each
other. Setup errors are one line on stderr and a non-zero status.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from milterapp import COMPILED, __version__
from milterapp.app import App
from milterapp.errors import MilterError, ProtocolError
from milterapp.server.logsetup import configure_logging
from milterapp.server.loops import LOOP_NAMES

__all__ = ["main"]

_BUILD = "compiled with mypyc" if COMPILED else "pure Python"


class CommandError(Exception):
    """A problem to report in one line, with the exit status to use."""

    def __init__(self, message: str, status: int = 2) -> None:
        super().__init__(message)
        self.status = status


def load_app(target: str) -> App:
    """Import ``module:attribute`` (attribute defaults to ``app``) and return the App."""
    module_name, _, attribute = target.partition(":")
    attribute = attribute or "app"
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))  # as `python -m` would, for local modules
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise CommandError(
                f"module {module_name!r} not found (run from its directory?)"
            ) from None
        raise
    app = getattr(module, attribute, None)
    if not isinstance(app, App):
        found = "nothing" if app is None else type(app).__name__
        raise CommandError(f"{module_name}:{attribute} is {found}, not a milterapp App")
    return app


def _octal(text: str) -> int:
    try:
        return int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an octal mode like 660") from None


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return value


def _add_server_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("server options (see docs/server.md)")
    group.add_argument("--spec", help="where to listen, e.g. inet:10025@[127.0.0.1] or unix:/path")
    group.add_argument("--backlog", type=int)
    group.add_argument("--unix-socket-mode", type=_octal, metavar="MODE")
    group.add_argument("--unix-socket-group", metavar="GROUP")
    group.add_argument(
        "--keep-stale-unix-socket",
        dest="remove_unix_socket_on_create",
        action="store_false",
        default=None,
        help="fail instead of removing a stale unix socket",
    )
    group.add_argument(
        "--keep-unix-socket-on-close",
        dest="remove_unix_socket_on_close",
        action="store_false",
        default=None,
        help="leave the unix socket file when stopping",
    )
    group.add_argument("--timeout", type=float, help="idle seconds before a connection is closed")
    group.add_argument("--shutdown-grace", type=float, help="seconds in-flight messages may take")
    group.add_argument("--max-data-size", type=int, help="largest packet accepted, in bytes")
    group.add_argument(
        "--max-connections", type=int, metavar="N", help="connections served at once (0: no limit)"
    )
    group.add_argument(
        "--max-macros-per-packet", type=int, metavar="N", help="macros in one D packet (256)"
    )
    group.add_argument("--max-headers", type=int, metavar="N", help="headers per message (1000)")
    group.add_argument(
        "--max-header-size", type=int, metavar="BYTES", help="largest header (262144)"
    )
    group.add_argument(
        "--max-recipients", type=int, metavar="N", help="recipients per message (1000)"
    )
    group.add_argument(
        "--read-timeout",
        type=float,
        metavar="SECONDS",
        help="time for a command to arrive whole once begun (60; 0: no limit)",
    )
    group.add_argument(
        "--write-timeout",
        type=float,
        metavar="SECONDS",
        help="time the MTA may leave replies unread (60; 0: no limit)",
    )
    group.add_argument(
        "--workers", type=_positive, default=1, metavar="N", help="processes serving (Linux; 1)"
    )
    group.add_argument(
        "--loop",
        choices=LOOP_NAMES,
        default="auto",
        help="event loop: uvloop when installed (auto), asyncio's, or uvloop",
    )
    group.add_argument("--log-format", choices=["text", "json"], default="text")
    group.add_argument(
        "--log-level",
        default="INFO",
        type=str.upper,
        choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"],
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="milterapp", description="Write, run and test Postfix and Sendmail milters."
    )
    parser.add_argument(
        "--version", action="version", version=f"milterapp {__version__} ({_BUILD})"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="serve an App", description="Serve module:app.")
    run.add_argument("target", metavar="MODULE:APP", help="e.g. mymilter:app")
    _add_server_options(run)

    send = commands.add_parser(
        "send",
        help="send a message to any milter as an MTA would",
        description="Talk to a running milter like Postfix or Sendmail and show its answers.",
    )
    send.add_argument("message", type=Path, metavar="MESSAGE.eml")
    send.add_argument("--spec", required=True, help="the milter, e.g. inet:10025@[127.0.0.1]")
    send.add_argument("--from", dest="sender", default="sender@example.org")
    send.add_argument("--to", dest="recipients", action="append", metavar="ADDR")
    send.add_argument("--client-address", default="192.0.2.10")
    send.add_argument("--client-name", default="client.example.org")
    send.add_argument("--helo", default="client.example.org")
    send.add_argument("--mta", choices=["postfix", "sendmail"], default="postfix")
    send.add_argument("--json", action="store_true", help="print one JSON object")
    send.add_argument(
        "--timeout", type=float, default=30.0, help="seconds to wait for each answer (30)"
    )

    demo = commands.add_parser("demo", help="show a milter at work (no setup needed)")
    demo.add_argument("--wire", action="store_true", help="show the packets, without sockets")

    bench = commands.add_parser(
        "bench",
        help="measure a running milter under load, as Postfix would load it",
        description="Drive a running milter with many MTA connections and report "
        "messages per second, latency and every answer.",
    )
    bench.add_argument("--spec", required=True, help="the milter, e.g. inet:10025@[127.0.0.1]")
    bench.add_argument("--connections", type=int, default=32, metavar="N", help="at once (32)")
    bench.add_argument("--duration", type=float, default=10.0, metavar="S", help="measured (10)")
    bench.add_argument("--warmup", type=float, default=1.0, metavar="S", help="not measured (1)")
    bench.add_argument(
        "--messages", type=int, default=0, metavar="N", help="send N messages instead of a duration"
    )
    bench.add_argument("--processes", type=int, default=1, metavar="N", help="generators (1)")
    bench.add_argument(
        "--messages-per-connection", type=int, default=10, metavar="N", help="then reconnect (10)"
    )
    bench.add_argument("--recipients", type=int, default=2, metavar="N", help="per message (2)")
    bench.add_argument("--headers", type=int, default=10, metavar="N", help="per message (10)")
    bench.add_argument("--body-size", type=int, default=4096, metavar="BYTES", help="(4096)")
    bench.add_argument(
        "--timeout", type=float, default=30.0, metavar="S", help="for each answer (30)"
    )
    bench.add_argument("--json", action="store_true", help="print one JSON object")

    record = commands.add_parser(
        "record",
        help="record an MTA's conversation with a milter",
        description="Proxy between an MTA and a milter, writing every packet to a file.",
    )
    record.add_argument("--listen", required=True, help="where the MTA connects")
    record.add_argument("--upstream", required=True, help="the milter")
    record.add_argument("--out", required=True, type=Path, help="the recording (JSON lines)")
    return parser


def _server_options(args: argparse.Namespace) -> dict[str, Any]:
    names = (
        "backlog",
        "unix_socket_mode",
        "unix_socket_group",
        "remove_unix_socket_on_create",
        "remove_unix_socket_on_close",
        "timeout",
        "read_timeout",
        "write_timeout",
        "shutdown_grace",
        "max_data_size",
        "max_connections",
        "max_macros_per_packet",
        "max_headers",
        "max_header_size",
        "max_recipients",
    )
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def _run(args: argparse.Namespace) -> int:
    app = load_app(args.target)
    spec = args.spec or os.environ.get("MILTERAPP_SPEC")
    app.run(
        spec,
        workers=args.workers,
        loop=args.loop,
        log_format=args.log_format,
        log_level=args.log_level,
        **_server_options(args),
    )
    return 0


def _send(args: argparse.Namespace) -> int:
    from milterapp.testing.client import AsyncMilterTestClient

    try:
        data = args.message.read_bytes()
    except OSError as exc:
        raise CommandError(f"cannot read {args.message}: {exc.strerror}") from None

    async def exchange() -> Any:
        client = AsyncMilterTestClient(target=args.spec, mta=args.mta, timeout=args.timeout)
        async with client:
            await client.connect(
                client_address=args.client_address, client_name=args.client_name, helo=args.helo
            )
            return await client.send_message(
                data, sender=args.sender, recipients=args.recipients or ["recipient@example.net"]
            )

    try:
        result = asyncio.run(exchange())
    except (ConnectionError, FileNotFoundError) as exc:
        raise CommandError(f"cannot talk to the milter at {args.spec}: {exc}", 1) from None
    except TimeoutError:
        message = f"the milter at {args.spec} did not answer within {args.timeout:g} s"
        raise CommandError(message, 1) from None
    except ProtocolError as exc:
        raise CommandError(f"the milter at {args.spec} broke the protocol: {exc}", 1) from None
    from milterapp.testing.report import print_result

    print_result(result, data, sender=args.sender, as_json=args.json, write=print)
    return 0


def _bench(args: argparse.Namespace) -> int:
    from milterapp.load.generator import LoadOptions, run_load

    try:
        options = LoadOptions(
            spec=args.spec,
            connections=args.connections,
            duration=args.duration,
            warmup=args.warmup,
            messages=args.messages,
            processes=args.processes,
            messages_per_connection=args.messages_per_connection,
            recipients=args.recipients,
            headers=args.headers,
            body_size=args.body_size,
            timeout=args.timeout,
        )
    except ValueError as exc:
        raise CommandError(f"invalid option: {exc}") from None
    result = run_load(options)
    if args.json:
        print(json.dumps(result.summary()))
    else:
        print(result.report(options))
    return 1 if result.errors or not result.messages or result.all_tempfailed else 0


def _record(args: argparse.Namespace) -> int:
    from milterapp.testing.recording import record_sync

    configure_logging("text", "INFO")
    record_sync(args.listen, args.upstream, args.out)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    args = _parser().parse_args(argv)
    try:
        return _dispatch(args)
    except BrokenPipeError:
        # Output piped into `head` and the like: stop quietly, as other tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _dispatch(args: argparse.Namespace) -> int:
    try:
        if args.command == "run":
            return _run(args)
        if args.command == "send":
            return _send(args)
        if args.command == "record":
            return _record(args)
        if args.command == "bench":
            return _bench(args)
        configure_logging("text", "WARNING")
        if args.wire:
            from milterapp.demo.wire import run_wire_demo

            return run_wire_demo()
        from milterapp.demo.live import run_demo

        return run_demo()
    except CommandError as exc:
        print(f"milterapp: error: {exc}", file=sys.stderr)
        return exc.status
    except MilterError as exc:
        print(f"milterapp: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
