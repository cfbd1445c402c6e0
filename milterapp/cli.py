"""The ``milterapp`` command line (also ``python -m milterapp``).

Commands: ``run`` serves an App from a module or a file; ``chain`` serves existing milters
chained as one (:mod:`milterapp.commands.chain`); ``send`` plays an MTA against any running
milter with a message file; ``bench`` loads a running milter as Postfix would and measures it;
``demo`` shows a milter at work; ``record`` records what an MTA and a milter say to each
other; ``check`` tells whether a milter answers. Every error is one line on stderr
and a non-zero status (docs/cli.md), but for a module that raises while it is imported, whose
traceback comes first.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib
import importlib.util
import ipaddress
import json
import math
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType, TracebackType
from typing import Any

from milterapp import COMPILED, __version__
from milterapp.app import App
from milterapp.commands.chain import add_chain_command, chain_app
from milterapp.errors import ConnectionSpecError, MilterError, ProtocolError
from milterapp.load.result import LoadOptions
from milterapp.server.arguments import (
    OneLineParser,
    add_server_arguments,
    given_options,
    number,
    whole_number,
)
from milterapp.server.logsetup import configure_logging

__all__ = ["main"]

_BUILD = "compiled with mypyc" if COMPILED else "pure Python"


class CommandError(Exception):
    """A problem to report in one line, with the exit status to use and who reports it."""

    def __init__(self, message: str, status: int = 2, prog: str = "milterapp") -> None:
        super().__init__(message)
        self.status = status
        self.prog = prog


# --- the App to run -------------------------------------------------------------------------

_MISSING = object()


def load_app(target: str) -> App:
    """The App named by ``target``: ``module[:attribute]`` or ``path/to/file.py[:attribute]``.

    The attribute defaults to ``app``. A module is looked for in the current directory first,
    as ``python -m`` does; a file is loaded as a module of its name, with its directory on
    ``sys.path`` so that it can import its siblings.
    """
    where, sep, attribute = target.rpartition(":")
    if not sep or not (attribute.isidentifier() or not attribute):
        where, attribute = target, ""
    attribute = attribute or "app"
    if where.endswith(".py") or os.sep in where or "/" in where:
        module, label = _load_file(where), where
    else:
        module, label = _import(where), f"module {where!r}"
    found = getattr(module, attribute, _MISSING)
    if found is _MISSING:
        raise CommandError(f"{label} has no attribute {attribute!r}")
    if not isinstance(found, App):
        raise CommandError(f"{where}:{attribute} is {_a(found)}, not a milterapp App")
    return found


def _a(value: object) -> str:
    """What ``value`` is, with its article: ``a set``, ``an int``, ``None``, ``a class``."""
    if value is None:
        return "None"
    kind = "class" if isinstance(value, type) else type(value).__name__
    return f"{'an' if kind[:1].lower() in 'aeiou' else 'a'} {kind}"


def _import(name: str) -> ModuleType:
    if not all(part.isidentifier() for part in name.split(".")):
        raise CommandError(f"{name!r} is neither a module name nor a path to a .py file")
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))  # as `python -m` would, for local modules
    module: ModuleType = _executed(lambda: importlib.import_module(name), f"module {name!r}", name)
    return module


def _load_file(text: str) -> ModuleType:
    path = Path(text)
    if not path.is_file():
        problem = "it is a directory" if path.is_dir() else "no such file"
        raise CommandError(f"cannot load {text}: {problem}")
    spec = importlib.util.spec_from_file_location(path.stem, path.resolve())
    if path.suffix != ".py" or spec is None or spec.loader is None:
        raise CommandError(f"cannot load {text}: not a Python file (.py)")
    module, loader = importlib.util.module_from_spec(spec), spec.loader
    directory = str(path.resolve().parent)
    if directory not in sys.path:
        sys.path.insert(0, directory)  # its sibling modules import as from its directory
    registered = sys.modules.setdefault(spec.name, module) is module
    try:
        _executed(lambda: loader.exec_module(module), text)
    except BaseException:
        if registered:
            del sys.modules[spec.name]
        raise
    return module


def _executed(load: Callable[[], Any], label: str, name: str | None = None) -> Any:
    """Run the import ``load`` (of module ``name``, if by name); a failure is a CommandError.

    The module not found, a syntax error or a failing import in it are one line, with the
    file and line. Anything else the module raises is a bug in it: its traceback is printed
    first, from its own frames (docs/cli.md).
    """
    try:
        return load()
    except ImportError as exc:
        missing = exc.name if isinstance(exc, ModuleNotFoundError) else None
        if name and missing and (name == missing or name.startswith(f"{missing}.")):
            hint = "run from its directory, or give the path to its file"
            raise CommandError(f"module {name!r} not found ({hint})") from None
        problem = f"{_where(exc.__traceback__)}: {exc}"
    except SyntaxError as exc:
        problem = f"{exc.filename}, line {exc.lineno}: {exc.msg}"
    except Exception as exc:  # noqa: BLE001 - the module's own bug: show where it is
        traceback.print_exception(type(exc), exc, _theirs(exc.__traceback__))
        problem = f"{type(exc).__name__}: {exc} (traceback above)"
    raise CommandError(f"cannot import {label}: {problem}", 1)


def _ours(tb: TracebackType) -> bool:
    name = tb.tb_frame.f_code.co_filename
    return name in (__file__, importlib.__file__) or name.startswith("<frozen ")


def _theirs(tb: TracebackType | None) -> TracebackType | None:
    """The traceback from its first frame that is not milterapp's nor importlib's."""
    while tb is not None and _ours(tb):
        tb = tb.tb_next
    return tb


def _where(tb: TracebackType | None) -> str:
    """The file and line of the last frame of ``tb`` that is not ours."""
    last = None
    while tb is not None:
        last = last if _ours(tb) else tb
        tb = tb.tb_next
    if last is None:
        return "location unknown"
    return f"{last.tb_frame.f_code.co_filename}, line {last.tb_lineno}"


# --- the parser -----------------------------------------------------------------------------


def _seconds(text: str) -> float:
    value = number(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, not {text}")
    return value


def _ip_address(text: str) -> str:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an IPv4 or IPv6 address, not {text!r}") from None
    return text


def _parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="milterapp", description="Write, run and test Postfix and Sendmail milters."
    )
    parser.add_argument(
        "--version", action="version", version=f"milterapp {__version__} ({_BUILD})"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser(
        "run", help="serve an App", description="Serve the App of a module or a file."
    )
    run.add_argument(
        "target", metavar="MODULE:APP", help="mymilter:app, or path/to/mymilter.py[:app]"
    )
    add_server_arguments(run)
    add_chain_command(commands)

    send = commands.add_parser(
        "send",
        help="send a message to any milter as an MTA would",
        description="Talk to a running milter like Postfix or Sendmail and show its answers.",
    )
    send.add_argument(
        "message",
        type=Path,
        metavar="MESSAGE.eml",
        help="the message: RFC 5322 headers, a blank line, the body (LF or CRLF)",
    )
    send.add_argument("--spec", required=True, help="the milter, e.g. inet:10025@[127.0.0.1]")
    send.add_argument(
        "--from",
        dest="sender",
        default="sender@example.org",
        help="envelope sender, MAIL FROM (sender@example.org)",
    )
    send.add_argument(
        "--to",
        dest="recipients",
        action="append",
        metavar="ADDR",
        help="envelope recipient, RCPT TO; repeat for several (recipient@example.net)",
    )
    send.add_argument(
        "--client-address",
        type=_ip_address,
        default="192.0.2.10",
        help="the SMTP client's IPv4 or IPv6 address (192.0.2.10)",
    )
    send.add_argument(
        "--client-name",
        default="client.example.org",
        help="the SMTP client's host name (client.example.org)",
    )
    send.add_argument(
        "--helo", default="client.example.org", help="the HELO name (client.example.org)"
    )
    send.add_argument(
        "--mta",
        choices=["postfix", "sendmail"],
        default="postfix",
        help="which MTA to play: its macros and header rules (postfix)",
    )
    send.add_argument("--json", action="store_true", help="print one JSON object")
    send.add_argument(
        "--timeout", type=_seconds, default=30.0, help="seconds to wait for each answer (30)"
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

    check = commands.add_parser(
        "check",
        help="check that a milter answers (for monitoring, HAProxy, systemd)",
        description="Connect to a milter, negotiate as Postfix does, and print one line.",
    )
    check.add_argument("spec", metavar="SPEC", help="the milter, e.g. inet:10025@[127.0.0.1]")
    check.add_argument(
        "--timeout", type=_seconds, default=5.0, help="seconds the whole check may take (5)"
    )
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
        type=whole_number if isinstance(default, int) else number,
        default=default,
        metavar=field.metadata["metavar"],
        help=f"{field.metadata['help']} ({default:g})",
    )


# --- the commands ---------------------------------------------------------------------------


def _run(args: argparse.Namespace) -> int:
    app = load_app(args.target)
    app.run(argv=[], **given_options(args))  # the command line is parsed already
    return 0


def _chain(args: argparse.Namespace) -> int:
    chain_app(args.milters).run(argv=[], **given_options(args))
    return 0


def _file_problem(path: Path, exc: OSError, *, writing: bool) -> str:
    """``cannot read PATH: WHY`` (or write), in one line."""
    if isinstance(exc, FileNotFoundError):
        why = f"directory '{path.parent}' does not exist" if writing else "no such file"
    elif isinstance(exc, IsADirectoryError):
        why = "it is a directory"
    elif isinstance(exc, PermissionError):
        why = "permission denied"
    else:
        why = (exc.strerror or str(exc)).lower()
    return f"cannot {'write' if writing else 'read'} {path}: {why}"


def _send(args: argparse.Namespace) -> int:
    from milterapp.testing.client import AsyncMilterTestClient

    try:
        data = args.message.read_bytes()
    except OSError as exc:
        raise CommandError(_file_problem(args.message, exc, writing=False)) from None

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
    except ConnectionSpecError as exc:
        raise CommandError(str(exc), 1) from None
    except ValueError as exc:  # "connections: must be at least 1, not 0"
        name, _, problem = str(exc).partition(": ")
        flag = f"--{name.replace('_', '-')}"
        raise CommandError(f"{flag}: {problem}", prog="milterapp bench") from None
    result = run_load(options)
    if args.json:
        print(json.dumps(result.summary()))
    else:
        print(result.report(options))
    return 1 if result.errors or not result.messages or result.all_tempfailed else 0


def _record(args: argparse.Namespace) -> int:
    from milterapp.testing.recording import record_sync

    configure_logging("text", "INFO")
    try:
        record_sync(args.listen, args.upstream, args.out)
    except OSError as exc:
        if exc.filename != str(args.out):
            raise
        raise CommandError(_file_problem(args.out, exc, writing=True)) from None
    return 0


def _check(args: argparse.Namespace) -> int:
    from milterapp.server.check import check_milter

    if math.isinf(args.timeout):
        raise CommandError("--timeout: must be a finite number, not inf", prog="milterapp check")
    try:
        result = check_milter(args.spec, timeout=args.timeout)
    except ConnectionSpecError as exc:
        print(f"milterapp: check failed: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - monitoring reads one line, never a traceback
        problem = str(exc) if isinstance(exc, MilterError) else f"{type(exc).__name__}: {exc}"
        print(f"milterapp: check failed: {problem}", file=sys.stderr)
        return 1
    print(result.status_line())
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
        if args.command == "chain":
            return _chain(args)
        if args.command == "send":
            return _send(args)
        if args.command == "record":
            return _record(args)
        if args.command == "bench":
            return _bench(args)
        if args.command == "check":
            return _check(args)
        configure_logging("text", "WARNING")
        if args.wire:
            from milterapp.demo.wire import run_wire_demo

            return run_wire_demo()
        from milterapp.demo.live import run_demo

        return run_demo()
    except CommandError as exc:
        print(f"{exc.prog}: error: {exc}", file=sys.stderr)
        return exc.status
    except MilterError as exc:
        print(f"milterapp: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
