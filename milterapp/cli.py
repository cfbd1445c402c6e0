"""The ``milterapp`` command line (also ``python -m milterapp``).

Commands: ``run`` serves an App from a module; ``send`` plays an MTA against any running
milter with a message file; ``bench`` loads a running milter as Postfix would and measures it;
``demo`` shows a milter at work; ``record`` records what an MTA and a milter say to each
other. Setup errors are one line on stderr and a non-zero status.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final, get_args

from pydantic.fields import FieldInfo

from milterapp import COMPILED, __version__
from milterapp.app import App
from milterapp.errors import MilterError, ProtocolError
from milterapp.load.result import LoadOptions
from milterapp.server.limits import Limits
from milterapp.server.logsetup import configure_logging
from milterapp.server.loops import LOOP_NAMES
from milterapp.server.options import ServerOptions

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


#: Server options that are no flags: a socket object, and the holder of the limits (whose
#: own fields are flags).
_NOT_FLAGS: Final = frozenset({"listen_socket", "socket_activation", "limits"})
#: Options on by default, and the flag that turns each off.
_OFF_FLAGS: Final = {
    "remove_unix_socket_on_create": "--keep-stale-unix-socket",
    "remove_unix_socket_on_close": "--keep-unix-socket-on-close",
}
#: How a value is written on the command line, where that is not ``str()``.
_OCTAL: Final = frozenset({"unix_socket_mode"})


def _option_fields() -> dict[str, FieldInfo]:
    """The fields of ServerOptions and of its Limits that are command-line flags, in order."""
    fields = {n: f for n, f in ServerOptions.model_fields.items() if n not in _NOT_FLAGS}
    return {**fields, **Limits.model_fields}


def _shown(name: str, field: FieldInfo) -> str:
    default = field.get_default(call_default_factory=True)
    if default is None:
        return "none"
    if name in _OCTAL:
        return f"{default:o}"
    return f"{default:g}" if isinstance(default, float) else str(default)


def _add_option(group: argparse._ArgumentGroup, name: str, field: FieldInfo) -> None:
    """One flag for ``field``: its name, type, help and default all come from the field."""
    if name in _OFF_FLAGS:
        group.add_argument(
            _OFF_FLAGS[name],
            dest=name,
            action="store_false",
            default=None,
            help=f"do not {field.description}",
        )
        return
    kinds = set(get_args(field.annotation) or (field.annotation,))
    kind: Callable[[str], Any]
    if name in _OCTAL:
        kind, metavar = _octal, "MODE"
    elif float in kinds:
        kind, metavar = float, "SECONDS"
    elif int in kinds and str not in kinds:
        kind, metavar = int, "N"
    else:  # text, or a value parsed from text (the spec)
        kind, metavar = str, name.rpartition("_")[2].upper()
    group.add_argument(
        f"--{name.replace('_', '-')}",
        type=kind,
        metavar=metavar,
        help=f"{field.description} (default: {_shown(name, field)})",
    )


def _add_server_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("server options (see docs/server.md)")
    for name, field in _option_fields().items():
        _add_option(group, name, field)
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
    for field in dataclasses.fields(LoadOptions):
        _add_load_option(bench, field)
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


def _add_load_option(parser: argparse.ArgumentParser, field: dataclasses.Field[Any]) -> None:
    """One ``bench`` flag for a field of LoadOptions: help and default from the field."""
    flag = f"--{field.name.replace('_', '-')}"
    if field.default is dataclasses.MISSING:
        parser.add_argument(flag, required=True, help=field.metadata["help"])
        return
    default = field.default
    parser.add_argument(
        flag,
        type=type(default),
        default=default,
        metavar=field.metadata["metavar"],
        help=f"{field.metadata['help']} ({default:g})",
    )


def _server_options(args: argparse.Namespace) -> dict[str, Any]:
    """The server options given on the command line (the spec apart), by name."""
    given = {name: getattr(args, name) for name in _option_fields() if name != "spec"}
    return {name: value for name, value in given.items() if value is not None}


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
    from milterapp.load.generator import run_load

    try:
        options = LoadOptions(
            **{field.name: getattr(args, field.name) for field in dataclasses.fields(LoadOptions)}
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
