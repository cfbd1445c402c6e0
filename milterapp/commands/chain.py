"""``milterapp chain``: existing milters chained as one, as milter manager does, with no Python
to write.

Each ``--milter NAME=SPEC[,OPTION=VALUE...]`` is one upstream milter, in the chain's order:
:func:`parse_milter` reads it into a :class:`ChainedMilter` (its
:class:`~milterapp.chain.upstream.UpstreamOptions`, whether its connections are reused, and
its conditions on macros), and :func:`chain_app` makes the App that calls them, with
``app.use_milter()`` once each and no handlers of its own. The command serves that App as
``milterapp run`` serves one, with the same server options (:func:`add_chain_command`).

A condition (``if_macro``, ``unless_macro``) reads the MTA's macros at MAIL FROM; several on
one milter must all hold. A macro is *set* when the MTA sent it with a non-empty value.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from pydantic import ValidationError

from milterapp.app import App
from milterapp.context import Context
from milterapp.errors import SetupError
from milterapp.server.arguments import add_server_arguments, describe
from milterapp.server.options import ServerOptions
from milterapp.smtpvalues import macro_name

if TYPE_CHECKING:  # the chain package is imported by the chain command alone, not by the
    # command line's parser: `milterapp run` serves without it
    from milterapp.chain.options import UpstreamOptions

__all__ = [
    "OPTIONS",
    "ChainedMilter",
    "MacroCondition",
    "add_chain_command",
    "chain_app",
    "parse_milter",
]

#: The options of a ``--milter`` value, in the order the help lists them, with their values.
OPTIONS: Final = {
    "on_failure": "tempfail|accept|reject",
    "connect_timeout": "SECONDS",
    "command_timeout": "SECONDS",
    "eom_timeout": "SECONDS",
    "reuse": "yes|no",
    "if_macro": "NAME[=VALUE]",
    "unless_macro": "NAME[=VALUE]",
}
_TIMEOUTS: Final = ("connect_timeout", "command_timeout", "eom_timeout")
#: The condition options, and whether each is negated.
_CONDITIONS: Final = {"if_macro": False, "unless_macro": True}
_YES: Final = frozenset({"yes", "true", "on", "1"})
_NO: Final = frozenset({"no", "false", "off", "0"})
_FORM: Final = "NAME=SPEC[,OPTION=VALUE...]"
#: Characters a macro name may not hold (besides whitespace and the unprintable).
_NOT_IN_MACRO: Final = frozenset("{},=")


@dataclass(frozen=True)
class MacroCondition:
    """One ``if_macro`` or ``unless_macro``.

    Attributes:
        macro: the macro's name as the MTA sends it: ``{auth_authen}``, ``i``.
        value: the value it must have; None: any non-empty value.
        negated: ``unless_macro``: the milter applies when the macro does *not* match.
    """

    macro: str
    value: str | None = None
    negated: bool = False

    def __str__(self) -> str:
        kind = "unless_macro" if self.negated else "if_macro"
        return f"{kind}={self.macro}" + ("" if self.value is None else f"={self.value}")

    def holds(self, macros: Mapping[str, str]) -> bool:
        """Whether the condition holds for these macros (looked up with or without braces)."""
        found = macros.get(self.macro)
        if found is None:
            found = macros.get(macro_name(self.macro))
        matches = bool(found) if self.value is None else found == self.value
        return matches != self.negated


@dataclass(frozen=True)
class ChainedMilter:
    """One ``--milter``: where it listens and its deadlines and failure policy
    (``options``), whether its connections are kept across MTA connections (``reuse``), and
    the ``conditions`` under which it is given a message (all must hold)."""

    options: UpstreamOptions
    reuse: bool = True
    conditions: tuple[MacroCondition, ...] = ()

    def applies(self, ctx: Context[Any, Any]) -> bool:
        """Whether every condition holds for the MTA's macros (asked at MAIL FROM)."""
        return all(condition.holds(ctx.macros) for condition in self.conditions)


# --- one --milter value ---------------------------------------------------------------------


def parse_milter(text: str) -> ChainedMilter:
    """The milter of one ``--milter`` value: ``NAME=SPEC[,OPTION=VALUE...]``.

    Raises:
        ValueError: the value is malformed, in one line that starts with the milter's name
            (or the value, when it has no name): ``local: unknown option 'foo' (valid: ...)``.
    """
    name, sep, rest = text.partition("=")
    if not sep or not name or ":" in name or "," in name:
        raise ValueError(f"{text!r}: expected {_FORM}, e.g. opendkim=inet:8891@[127.0.0.1]")
    spec, *pairs = rest.split(",")
    fields: dict[str, Any] = {"name": name, "spec": spec.strip()}
    reuse = True
    conditions: list[MacroCondition] = []
    given: set[str] = set()
    for pair in pairs:
        key, sep, value = (part.strip() for part in pair.partition("="))
        key = key.replace("-", "_")
        if not pair.strip():
            raise ValueError(f"{name}: an empty option (two commas in a row, or one at the end)")
        if key not in OPTIONS:
            known = ", ".join(OPTIONS)
            raise ValueError(f"{name}: unknown option {key!r} (valid: {known})")
        if not sep or not value:
            raise ValueError(f"{name}: option {key} needs a value ({key}={OPTIONS[key]})")
        if key in _CONDITIONS:
            conditions.append(_condition(name, key, value))
            continue
        if key in given:
            raise ValueError(f"{name}: option {key} is given twice")
        given.add(key)
        if key == "reuse":
            reuse = _yes_or_no(name, value)
        elif key in _TIMEOUTS:
            fields[key] = _seconds(name, key, value)
        else:
            fields[key] = value
    return ChainedMilter(_validated(fields), reuse, tuple(conditions))


def _validated(fields: dict[str, Any]) -> UpstreamOptions:
    from milterapp.chain.options import UpstreamOptions

    name = fields["name"]
    try:
        return UpstreamOptions.model_validate(fields)
    except ValidationError as exc:
        for error in exc.errors():
            if error["loc"] == ("name",):  # "name 'a b' must be non-empty letters, ..."
                raise ValueError(str(error.get("ctx", {}).get("error", error["msg"]))) from None
        raise ValueError(f"{name}: {describe(exc)}") from None


def _seconds(name: str, key: str, value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"{name}: {key}: must be a number, not {value!r}") from None


def _yes_or_no(name: str, value: str) -> bool:
    if value.lower() in _YES:
        return True
    if value.lower() in _NO:
        return False
    raise ValueError(f"{name}: reuse: must be yes or no, not {value!r}")


def _condition(name: str, key: str, value: str) -> MacroCondition:
    """``if_macro=NAME[=VALUE]`` or ``unless_macro=...``: the macro named as the MTA sends
    it (one letter bare, longer names in braces), and the value it must have."""
    macro, sep, expected = value.partition("=")
    bare = macro_name(macro)
    if not bare or any(c in _NOT_IN_MACRO or c.isspace() or not c.isprintable() for c in bare):
        raise ValueError(f"{name}: {key}: {macro!r} is not a macro name, like {{auth_authen}} or i")
    if sep and not expected:
        raise ValueError(
            f"{name}: {key}={macro}= has no value after '=' (leave it out to ask whether "
            "the macro is set)"
        )
    braced = bare if len(bare) == 1 else f"{{{bare}}}"
    return MacroCondition(braced, expected if sep else None, _CONDITIONS[key])


# --- the App --------------------------------------------------------------------------------


def chain_app(milters: Sequence[ChainedMilter], name: str = "chain") -> App:
    """An App without handlers of its own that calls ``milters`` in order.

    The macros the conditions read are asked of the MTA at MAIL FROM, which matters only when
    every upstream milter asks for a list of its own (else the MTA sends what its
    configuration says, and Postfix's and Sendmail's defaults hold ``{auth_authen}``).

    Raises:
        SetupError: no milter, or two with the same name.
    """
    if not milters:
        raise SetupError("a chain needs at least one milter (--milter NAME=SPEC)")
    macros = tuple(dict.fromkeys(c.macro for milter in milters for c in milter.conditions))
    app = App(name, macros={"envfrom": macros}) if macros else App(name)
    for milter in milters:
        options = milter.options
        app.use_milter(
            str(options.spec),
            name=options.name,
            when=milter.applies if milter.conditions else None,
            when_at="envfrom",
            connect_timeout=options.connect_timeout,
            command_timeout=options.command_timeout,
            eom_timeout=options.eom_timeout,
            on_failure=options.on_failure,
            reuse=milter.reuse,
        )
    return app


# --- the command line -----------------------------------------------------------------------


class _AddMilter(argparse.Action):
    """``--milter``: parse the value, add it to the list, refuse a name given twice."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        try:
            milter = parse_milter(str(values))
        except ValueError as exc:
            raise argparse.ArgumentError(None, f"--milter {exc}") from None
        milters: list[ChainedMilter] = list(getattr(namespace, self.dest, None) or [])
        if any(m.options.name == milter.options.name for m in milters):
            name = milter.options.name
            raise argparse.ArgumentError(
                None, f"--milter {name}: another milter is called {name!r}"
            )
        setattr(namespace, self.dest, [*milters, milter])


def _default(key: str) -> str:
    from milterapp.chain.options import UpstreamOptions

    return f"{UpstreamOptions.model_fields[key].default:g}"


DESCRIPTION: Final = """\
Serve a chain of existing milters as one milter, as milter manager does: the
MTA connects to --listen, and every message goes through each --milter in the
order given, each seeing the edits of those before it; their verdicts and
edits go back to the MTA as one milter's.
"""

#: The help's epilog; the defaults of the deadlines are filled in when it is shown
#: (:class:`_HelpFormatter`).
EPILOG: Final = """\
options of a --milter, after its spec, separated by commas:
  on_failure=tempfail|accept|reject
                        what a message gets when this milter is down, times
                        out or breaks the protocol (default: tempfail;
                        accept: go on without it)
  connect_timeout=SECONDS
                        to connect and negotiate (default: {connect_timeout})
  command_timeout=SECONDS
                        for each command's answer (default: {command_timeout})
  eom_timeout=SECONDS   for the answer to end of message (default: {eom_timeout})
  reuse=yes|no          keep connections to it across MTA connections
                        (default: yes)
  if_macro=NAME[=VALUE] give it a message only when the MTA's macro NAME is
                        set at MAIL FROM (to VALUE, if given); NAME with or
                        without braces: {{auth_authen}}, auth_authen
  unless_macro=NAME[=VALUE]
                        do not give it a message when macro NAME is set (to
                        VALUE, if given)

examples:
  milterapp chain --listen 'inet:10025@[127.0.0.1]' \\
      --milter opendkim=inet:8891@127.0.0.1 \\
      --milter 'local=unix:/run/guard.sock,on_failure=accept'

  DKIM signing for the submission service only (its master.cf entry has
  -o milter_macro_daemon_name=submission), no spam checks for authenticated
  senders:
  milterapp chain --listen unix:/run/chain/chain.sock \\
      --unix-socket-group postfix \\
      --milter 'opendkim=inet:8891@127.0.0.1,if_macro={{daemon_name}}=submission' \\
      --milter 'spamass=unix:/run/spamass.sock,unless_macro={{auth_authen}}'

docs/cli.md describes it all.
"""


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The chain command's help, with :data:`EPILOG`'s defaults read from UpstreamOptions
    when it is shown, not when the command line's parser is built."""

    def add_text(self, text: str | None) -> None:
        if text is EPILOG:
            text = EPILOG.format(**{key: _default(key) for key in _TIMEOUTS})
        super().add_text(text)


def add_chain_command(commands: argparse._SubParsersAction[Any]) -> None:
    """Add the ``chain`` command to ``commands``: ``--milter``, ``--listen`` (also called
    ``--spec``, as in ``milterapp run``) and every server option of ``milterapp run``."""
    parser = commands.add_parser(
        "chain",
        help="serve a chain of existing milters as one, as milter manager does",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=_HelpFormatter,
        conflict_handler="resolve",  # --listen takes over run's --spec
    )
    parser.add_argument(
        "--milter",
        dest="milters",
        action=_AddMilter,
        required=True,
        metavar=_FORM,
        help="an upstream milter, e.g. opendkim=inet:8891@127.0.0.1; repeat it for each, "
        "in the chain's order (options below)",
    )
    add_server_arguments(parser)
    spec = ServerOptions.model_fields["spec"]
    default = spec.get_default(call_default_factory=True)
    parser.add_argument(
        "--listen",
        "--spec",
        dest="spec",
        metavar="SPEC",
        default=argparse.SUPPRESS,
        help=f"{spec.description} (default: $MILTERAPP_SPEC, else {default})",
    )
