"""The server's options on a command line, for ``milterapp run`` and ``app.run()`` alike.

Every flag is made from a field of :class:`~milterapp.server.options.ServerOptions`, of its
:class:`~milterapp.server.limits.Limits` or of :class:`~milterapp.server.options.RunOptions`:
its name, type, help text and default. Each value is validated by its field as it is parsed,
and a bad one is one line naming the flag, in our own words (no usage, no pydantic wording)::

    milterapp run: error: --timeout: must be greater than 0, not -5

:func:`describe` words the options a script passes in code the same way. ``--spec`` is
checked when the server starts, as every spec is.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, Final, Literal, NoReturn, get_args, get_origin

from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import ErrorDetails

from milterapp.server.limits import Limits
from milterapp.server.logsetup import DEFAULT_SYSLOG_ADDRESS
from milterapp.server.options import RunOptions, ServerOptions

__all__ = [
    "OneLineParser",
    "add_server_arguments",
    "describe",
    "given_options",
    "number",
    "parse_command_line",
    "program_name",
    "settle",
    "whole_number",
]


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line, ``PROG: error: WHAT``, with status 2."""

    def error(self, message: str) -> NoReturn:
        """Print ``message`` in one line (no usage) and exit with status 2."""
        self.exit(2, f"{self.prog}: error: {message.removeprefix('argument ')}\n")


def whole_number(text: str) -> int:
    """``text`` as an int (an argparse ``type``), or an error in our words."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, not {text!r}") from None


def number(text: str) -> float:
    """``text`` as a float (an argparse ``type``), or an error in our words."""
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, not {text!r}") from None


def _octal(text: str) -> int:
    try:
        return int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an octal mode like 660, not {text!r}") from None


#: Fields that are no flags: a socket object, and the holder of the limits (whose own fields
#: are flags).
_NOT_FLAGS: Final = frozenset({"listen_socket", "socket_activation", "limits"})
#: Options on by default, and the flag that turns each off.
_OFF_FLAGS: Final = {
    "remove_unix_socket_on_create": "--keep-stale-unix-socket",
    "remove_unix_socket_on_close": "--keep-unix-socket-on-close",
}
#: Options written in octal.
_OCTAL: Final = frozenset({"unix_socket_mode"})
#: Options whose flag may come without its value, and the value it then means.
_BARE: Final = {"syslog": DEFAULT_SYSLOG_ADDRESS}
#: Every flag's option, in order, with the model that validates it.
_FLAGS: Final = {
    name: (model, field)
    for model in (ServerOptions, Limits, RunOptions)
    for name, field in model.model_fields.items()
    if name not in _NOT_FLAGS
}


def _shown(name: str, value: Any, *, code: bool = True) -> str:
    """A value as a message (``code``) or a help text shows it: octal modes in octal."""
    if value is None and not code:
        return "none"
    if name in _OCTAL and isinstance(value, int):
        return f"0o{value:o}" if code else f"{value:o}"
    if isinstance(value, float):
        return f"{value:g}"
    return repr(value) if code else str(value)


def _kind(name: str, field: FieldInfo) -> tuple[Callable[[str], Any], str]:
    """How a flag's text becomes a value, and its metavar."""
    if name in _OCTAL:
        return _octal, "MODE"
    if get_origin(field.annotation) is Literal:
        return str, "{" + ",".join(get_args(field.annotation)) + "}"
    kinds = set(get_args(field.annotation) or (field.annotation,))
    if float in kinds:
        return number, "SECONDS"
    if int in kinds and str not in kinds:
        return whole_number, "N"
    return str, name.rpartition("_")[2].upper()  # text, or a value parsed from text (the spec)


def _checked(model: type[BaseModel], name: str, convert: Callable[[str], Any]) -> Any:
    """An argparse ``type`` that validates the value with its field."""

    def parse(text: str) -> Any:
        value = convert(text)
        try:
            return getattr(model.model_validate({name: value}), name)
        except ValidationError as exc:
            typed = text if isinstance(value, int | float) else repr(text)
            raise argparse.ArgumentTypeError(_problems(exc, typed)[name]) from None

    return parse


def _bare(name: str) -> dict[str, Any]:
    """What lets a flag come without its value (``--syslog`` alone)."""
    return {"nargs": "?", "const": _BARE[name]} if name in _BARE else {}


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    """Add a flag for every server and run option; only the flags given end up in the
    namespace (see :func:`given_options`)."""
    group = parser.add_argument_group("server options (see docs/server.md)")
    for name, (model, field) in _FLAGS.items():
        if name in _OFF_FLAGS:
            group.add_argument(
                _OFF_FLAGS[name],
                dest=name,
                action="store_false",
                default=argparse.SUPPRESS,
                help=f"do not {field.description}",
            )
            continue
        convert, metavar = _kind(name, field)
        default = field.get_default(call_default_factory=True)
        group.add_argument(
            f"--{name.replace('_', '-')}",
            dest=name,
            type=convert if name == "spec" else _checked(model, name, convert),
            metavar=metavar,
            default=argparse.SUPPRESS,
            help=f"{field.description} (default: {_shown(name, default, code=False)})",
            **_bare(name),
        )


def given_options(args: argparse.Namespace) -> dict[str, Any]:
    """The options given on the command line, by their keyword in ``app.run()``."""
    return {name: getattr(args, name) for name in _FLAGS if hasattr(args, name)}


def program_name() -> str:
    """This program's name in its messages: the script's file, or ``python -m PACKAGE``."""
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "python"
    main_spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if name == "__main__.py" and main_spec is not None:
        return f"python -m {main_spec.name.removesuffix('.__main__')}"
    return name


def parse_command_line(argv: Sequence[str], description: str) -> dict[str, Any]:
    """The options given in ``argv``: ``--help`` prints them all and exits; an unknown or bad
    one is one line on stderr and exit status 2."""
    parser = OneLineParser(prog=program_name(), description=description)
    add_server_arguments(parser)
    return given_options(parser.parse_args(argv))


def settle(options: dict[str, Any], given: dict[str, Any]) -> tuple[RunOptions, dict[str, Any]]:
    """The options in effect, those ``given`` on the command line over the code's: run()'s own,
    validated, and the server's.

    Raises:
        pydantic.ValidationError: one of run()'s own options is unknown or out of range.
    """
    merged = {**options, **given}
    limits = {name: merged.pop(name) for name in Limits.model_fields if name in given}
    if limits and isinstance(options.get("limits"), Limits | dict):
        merged["limits"] = {**dict(options["limits"]), **limits}  # the command line's win
    else:
        merged.update(limits)
    own = {name: merged.pop(name) for name in RunOptions.model_fields if name in merged}
    return RunOptions.model_validate(own), merged


# --- what was wrong, in our words -----------------------------------------------------------

_MUST_BE: Final = {
    "int_type": "a whole number",
    "int_parsing": "a whole number",
    "int_from_float": "a whole number",
    "float_type": "a number",
    "float_parsing": "a number",
    "finite_number": "a finite number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "string_type": "text",
}
_BOUNDS: Final = {
    "greater_than": ("gt", "greater than"),
    "greater_than_equal": ("ge", "at least"),
    "less_than": ("lt", "less than"),
    "less_than_equal": ("le", "at most"),
}


def _wording(name: str, error: ErrorDetails, code: bool) -> tuple[str, bool]:
    """What one error says, and whether the value given should follow it."""
    kind, ctx = error["type"], error.get("ctx", {})
    if kind in _BOUNDS:
        key, words = _BOUNDS[kind]
        return f"must be {words} {_shown(name, ctx[key], code=code)}", True
    if kind in _MUST_BE:
        return f"must be {_MUST_BE[kind]}", True
    if kind == "literal_error":
        return f"must be {ctx['expected']}", True
    if kind == "is_instance_of":
        return f"must be a {ctx['class']}", True
    if kind == "model_type":  # a reply model, say: written as one is made
        return f"must be {ctx['class_name']}()", True
    if kind == "extra_forbidden":
        return "no such option", False
    if kind in ("value_error", "assertion_error"):
        return str(ctx["error"]), False
    message = error["msg"]
    return message[:1].lower() + message[1:], True


def _problems(exc: ValidationError, typed: str | None = None) -> dict[str, str]:
    """Each option's problem, by name: ``{"timeout": "must be greater than 0, not -5"}``.

    ``typed`` is the value as typed on the command line; without it, the value is shown as
    Python writes it. The alternatives of a union are joined (``must be text or a number``).
    """
    found: dict[str, tuple[list[str], Any, bool]] = {}
    for error in exc.errors():
        loc = error["loc"]
        if loc[:1] == ("limits",) and len(loc) > 1:  # a limit given by name: named so
            loc = loc[1:]
        name = str(loc[0]) if loc else "options"
        words, show = _wording(name, error, code=typed is None)
        phrases, _, _ = found.setdefault(name, ([], error["input"], show))
        if words not in phrases:
            phrases.append(words)
    problems = {}
    for name, (phrases, value, show) in found.items():
        text = " or ".join(p.removeprefix("must be ") if i else p for i, p in enumerate(phrases))
        if show:
            text += f", not {typed if typed is not None else _shown(name, value)}"
        problems[name] = text
    return problems


def describe(exc: ValidationError) -> str:
    """Options given in code, wrong, in one line: ``timeout: must be greater than 0, not -5``."""
    return "; ".join(f"{name}: {problem}" for name, problem in _problems(exc).items())
