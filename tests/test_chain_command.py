"""``milterapp chain``: the ``--milter`` values, their one-line errors, the chain App they make,
messages through it (real upstream milters served on loopback), and the command itself."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from milterapp import App, Context, EndOfMessage, EnvFrom
from milterapp.chain.options import UpstreamOptions
from milterapp.cli import _parser, main
from milterapp.commands.chain import ChainedMilter, MacroCondition, chain_app, parse_milter
from milterapp.errors import SetupError
from milterapp.replies import Accept, Continue, TempFail
from milterapp.server.arguments import given_options
from milterapp.testing import AsyncMilterTestClient, SessionFacts
from milterapp.testing.sockets import ServerThread
from tests.chain.test_upstream import spec_of
from tests.server.support import run, running_server

MESSAGE = b"From: a@example.org\r\nTo: b@example.net\r\nSubject: hi\r\n\r\nhello\r\n"


# --- the --milter values --------------------------------------------------------------------


def parsed(*argv: str) -> Any:
    """The namespace of ``milterapp chain ARGV``."""
    return _parser().parse_args(["chain", *argv])


def test_a_bare_milter_gets_the_defaults_of_use_milter() -> None:
    milter = parse_milter("opendkim=inet:8891@127.0.0.1")
    assert milter == ChainedMilter(
        UpstreamOptions(name="opendkim", spec="inet:8891@[127.0.0.1]"),  # type: ignore[arg-type]
        reuse=True,
        conditions=(),
    )
    assert milter.options.connect_timeout == 5.0
    assert milter.options.command_timeout == 8.0
    assert milter.options.eom_timeout == 120.0
    assert milter.options.on_failure == "tempfail"


def test_every_option_of_a_milter_is_read() -> None:
    milter = parse_milter(
        "local=unix:/run/guard.sock,on_failure=accept,connect_timeout=1.5,command_timeout=3,"
        "eom_timeout=300,reuse=no"
    )
    options = milter.options
    assert (options.name, str(options.spec)) == ("local", "unix:/run/guard.sock")
    assert (options.connect_timeout, options.command_timeout, options.eom_timeout) == (1.5, 3, 300)
    assert options.on_failure == "accept"
    assert milter.reuse is False
    # Spaces after commas, and hyphens as on the command line, are forgiven.
    again = parse_milter("local=unix:/run/guard.sock, on-failure=accept, reuse=yes")
    assert (again.options.on_failure, again.reuse) == ("accept", True)


@pytest.mark.parametrize(
    ("option", "condition"),
    [
        ("if_macro={daemon_name}=submission", MacroCondition("{daemon_name}", "submission")),
        ("if_macro=daemon_name=submission", MacroCondition("{daemon_name}", "submission")),
        ("unless_macro={auth_authen}", MacroCondition("{auth_authen}", None, negated=True)),
        ("unless_macro=auth_authen", MacroCondition("{auth_authen}", None, negated=True)),
        ("if_macro=i", MacroCondition("i")),
        ("if_macro={i}", MacroCondition("i")),
        ("if_macro={auth_type}=a=b", MacroCondition("{auth_type}", "a=b")),
    ],
)
def test_conditions_name_macros_as_the_mta_sends_them(
    option: str, condition: MacroCondition
) -> None:
    assert parse_milter(f"m=unix:/m.sock,{option}").conditions == (condition,)
    assert str(condition).partition("=")[0] == option.partition("=")[0]


def test_several_conditions_are_kept_in_order() -> None:
    milter = parse_milter("m=unix:/m.sock,unless_macro={auth_authen},if_macro=j=mx")
    assert milter.conditions == (
        MacroCondition("{auth_authen}", negated=True),
        MacroCondition("j", "mx"),
    )


@pytest.mark.parametrize(
    ("macros", "holds"),
    [
        ({}, False),
        ({"{daemon_name}": ""}, False),  # sent empty: not set
        ({"{daemon_name}": "smtpd"}, False),
        ({"{daemon_name}": "submission"}, True),
        ({"daemon_name": "submission"}, True),  # a table without braces
    ],
)
def test_a_condition_reads_the_macros_with_or_without_braces(
    macros: dict[str, str], holds: bool
) -> None:
    assert MacroCondition("{daemon_name}", "submission").holds(macros) is holds
    assert MacroCondition("{daemon_name}", "submission", negated=True).holds(macros) is not holds
    is_set = bool(macros and next(iter(macros.values())))
    assert MacroCondition("{daemon_name}").holds(macros) is is_set
    assert MacroCondition("{daemon_name}", negated=True).holds(macros) is not is_set


@pytest.mark.parametrize(
    ("value", "error"),
    [
        ("opendkim", "--milter 'opendkim': expected NAME=SPEC[,OPTION=VALUE...]"),
        ("inet:8891@127.0.0.1,on_failure=accept", "expected NAME=SPEC[,OPTION=VALUE...]"),
        ("=unix:/x.sock", "--milter '=unix:/x.sock': expected NAME=SPEC"),
        ("a b=unix:/x.sock", "--milter name 'a b' must be non-empty letters, digits"),
        ("a=inet:abc", "--milter a: spec: invalid connection spec 'inet:abc': port 'abc'"),
        ("a=", "--milter a: spec: invalid connection spec '': the spec is empty"),
        ("a=unix:/x.sock,foo=1", "--milter a: unknown option 'foo' (valid: on_failure, "),
        ("a=unix:/x.sock,", "--milter a: an empty option (two commas in a row, or one at the end)"),
        ("a=unix:/x.sock,=1", "--milter a: unknown option '' (valid: on_failure, "),
        ("a=unix:/x.sock,reuse", "--milter a: option reuse needs a value (reuse=yes|no)"),
        ("a=unix:/x.sock,reuse=maybe", "--milter a: reuse: must be yes or no, not 'maybe'"),
        (
            "a=unix:/x.sock,on_failure=ignore",
            "--milter a: on_failure: must be 'tempfail', 'accept' or 'reject', not 'ignore'",
        ),
        (
            "a=unix:/x.sock,command_timeout=-1",
            "--milter a: command_timeout: must be greater than 0, not -1",
        ),
        ("a=unix:/x.sock,eom_timeout=soon", "--milter a: eom_timeout: must be a number, not"),
        ("a=unix:/x.sock,connect_timeout=inf", "connect_timeout: must be a finite number"),
        ("a=unix:/x.sock,reuse=no,reuse=yes", "--milter a: option reuse is given twice"),
        ("a=unix:/x.sock,if_macro", "option if_macro needs a value (if_macro=NAME[=VALUE])"),
        ("a=unix:/x.sock,if_macro={daemon_name}=", "has no value after '='"),
        ("a=unix:/x.sock,unless_macro={auth", "unless_macro: '{auth' is not a macro name"),
        ("a=unix:/x.sock,if_macro={a b}", "if_macro: '{a b}' is not a macro name"),
    ],
)
def test_a_bad_milter_is_one_line_naming_the_problem_and_status_2(
    value: str, error: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["chain", "--milter", value])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("milterapp chain: error: --milter ")
    assert error in err
    assert err.count("\n") == 1


def test_a_name_used_twice_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["chain", "--milter", "a=unix:/x.sock", "--milter", "a=unix:/y.sock"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err == "milterapp chain: error: --milter a: another milter is called 'a'\n"


def test_a_chain_without_milters_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["chain", "--listen", "unix:/x.sock"])
    assert exc.value.code == 2
    assert capsys.readouterr().err == (
        "milterapp chain: error: the following arguments are required: --milter\n"
    )
    with pytest.raises(SetupError, match="a chain needs at least one milter"):
        chain_app([])


def test_the_milters_keep_their_order_and_the_server_options_are_runs() -> None:
    args = parsed(
        "--milter", "b=unix:/b.sock", "--listen", "unix:/chain.sock", "--milter",
        "a=inet:8891@127.0.0.1", "--workers", "3", "--log-format", "json", "--max-headers", "50",
    )  # fmt: skip
    assert [m.options.name for m in args.milters] == ["b", "a"]
    assert given_options(args) == {
        "spec": "unix:/chain.sock",
        "workers": 3,
        "log_format": "json",
        "max_headers": 50,
    }
    # --spec, as milterapp run calls it, is the same option; without either, nothing is
    # given and app.run() falls back on $MILTERAPP_SPEC, then the loopback default.
    assert given_options(parsed("--milter", "a=unix:/a.sock", "--spec", "unix:/s.sock")) == {
        "spec": "unix:/s.sock"
    }
    assert given_options(parsed("--milter", "a=unix:/a.sock")) == {}


def test_a_bad_server_option_is_reported_as_by_run(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["chain", "--milter", "a=unix:/a.sock", "--workers", "0"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err == "milterapp chain: error: --workers: must be at least 1, not 0\n"


def test_the_chain_app_uses_each_milter_with_its_options() -> None:
    args = parsed(
        "--milter", "dkim=inet:8891@127.0.0.1,if_macro={daemon_name}=submission,reuse=no",
        "--milter", "spam=unix:/spam.sock,on_failure=accept,unless_macro=auth_authen,eom_timeout=9",
    )  # fmt: skip
    app = chain_app(args.milters)
    assert app.name == "chain"
    assert not app.handles("eom")  # a pure chain: no handlers of its own
    dkim, spam = app.upstreams
    assert (dkim.options, spam.options) == tuple(m.options for m in args.milters)
    assert (dkim.reuse, spam.reuse) == (False, True)
    assert dkim.when_at == spam.when_at == "envfrom"
    # The macros the conditions read are asked for at MAIL FROM.
    assert app.config.macros == {"envfrom": ("{daemon_name}", "{auth_authen}")}
    plain = chain_app([parse_milter("x=unix:/x.sock")])
    assert plain.upstreams[0].when is None
    assert plain.config.macros == {}


# --- messages through the chain -------------------------------------------------------------


def stamper(header: str, seen: list[str] | None = None) -> App:
    """An upstream that adds ``header: yes``, and notes each sender it is given in ``seen``
    and the headers it sees as ``name: value``."""
    app = App(f"stamps-{header}", keep_message=True)
    notes = [] if seen is None else seen

    @app.on("envfrom")
    def mail(event: EnvFrom) -> None:
        notes.append(f"MAIL {event.address}")

    @app.on("eom")
    def stamp(event: EndOfMessage, ctx: Context) -> None:
        notes.extend(f"{h.name}: {h.value}" for h in ctx.message.headers)
        ctx.add_header(header, "yes")

    return app


@contextlib.asynccontextmanager
async def served(*apps: App) -> AsyncIterator[list[str]]:
    """Serve each app on loopback; yield their specs."""
    async with contextlib.AsyncExitStack() as stack:
        yield [spec_of(await stack.enter_async_context(running_server(app))) for app in apps]


def test_a_message_through_the_chain_gets_the_upstreams_header() -> None:
    async def main() -> None:
        async with served(stamper("X-Up")) as (spec,):
            app = chain_app(parsed("--milter", f"up={spec},reuse=no").milters)
            async with AsyncMilterTestClient(app) as client:
                result = await client.send_message(MESSAGE)
        assert result.verdict == Continue()
        assert result.delivered is not None
        assert result.delivered.header("X-Up") == "yes"

    run(main())


def test_the_milters_are_asked_in_the_order_given() -> None:
    second: list[str] = []

    async def main() -> None:
        async with served(stamper("X-First"), stamper("X-Second", second)) as (one, two):
            args = parsed("--milter", f"one={one},reuse=no", "--milter", f"two={two},reuse=no")
            async with AsyncMilterTestClient(chain_app(args.milters)) as client:
                result = await client.send_message(MESSAGE)
        assert result.delivered is not None
        assert result.delivered.header("X-First") == result.delivered.header("X-Second") == "yes"

    run(main())
    assert "X-First: yes" in second  # the second was given the first one's edit


def test_unless_macro_skips_the_milter_for_authenticated_senders() -> None:
    seen: list[str] = []

    async def main() -> None:
        async with served(stamper("X-Spam-Checked", seen)) as (spec,):
            milter = f"spam={spec},reuse=no,unless_macro={{auth_authen}}"
            app = chain_app(parsed("--milter", milter).milters)
            async with AsyncMilterTestClient(app) as client:
                authenticated = await client.send_message(
                    MESSAGE, sender="joe@example.org", macros={"M": {"{auth_authen}": "joe"}}
                )
                anonymous = await client.send_message(MESSAGE, sender="anon@example.org")
        # No party left for that message: the chain accepts it at MAIL FROM, unchanged.
        assert (authenticated.verdict, authenticated.stage) == (Accept(), "envfrom")
        assert anonymous.verdict == Continue()
        assert authenticated.delivered is not None
        assert authenticated.delivered.header("X-Spam-Checked") is None
        assert anonymous.delivered is not None
        assert anonymous.delivered.header("X-Spam-Checked") == "yes"

    run(main())
    assert [note for note in seen if note.startswith("MAIL")] == ["MAIL anon@example.org"]


@pytest.mark.parametrize(("daemon", "signed"), [("submission", True), (None, False)])
def test_if_macro_gives_the_milter_only_the_submission_service(
    daemon: str | None, signed: bool
) -> None:
    async def main() -> None:
        async with served(stamper("DKIM-Signature")) as (spec,):
            milter = f"dkim={spec},reuse=no,if_macro={{daemon_name}}=submission"
            app = chain_app(parsed("--milter", milter).milters)
            facts = SessionFacts(daemon_name=daemon)  # None: Postfix's smtpd
            async with AsyncMilterTestClient(app, facts=facts) as client:
                result = await client.send_message(MESSAGE)
        assert result.delivered is not None
        assert (result.delivered.header("DKIM-Signature") == "yes") is signed

    run(main())


@pytest.mark.parametrize(("policy", "accepted"), [("on_failure=accept,", True), ("", False)])
def test_a_milter_that_is_down_gets_its_failure_policy(
    policy: str, accepted: bool, sock_dir: Path
) -> None:
    async def main() -> None:
        async with served(stamper("X-Up")) as (spec,):
            down = f"down=unix:{sock_dir / 'nobody.sock'},{policy}reuse=no"
            args = parsed("--milter", down, "--milter", f"up={spec},reuse=no")
            async with AsyncMilterTestClient(chain_app(args.milters)) as client:
                result = await client.send_message(MESSAGE)
        if accepted:
            assert result.verdict == Continue()
            assert result.delivered is not None
            assert result.delivered.header("X-Up") == "yes"
        else:
            assert isinstance(result.verdict, TempFail)
            assert result.delivered is None

    run(main())


# --- the command ----------------------------------------------------------------------------


def test_chain_help_runs_as_a_module_and_describes_the_milter_options() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "milterapp", "chain", "--help"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    for words in ("--milter", "--listen", "--workers", "on_failure=", "unless_macro=", "examples"):
        assert words in result.stdout


def test_the_chain_command_serves_until_sigterm(sock_dir: Path) -> None:
    listen = sock_dir / "chain.sock"

    async def main(upstream: str) -> None:
        child = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "milterapp", "chain", "--listen", f"unix:{listen}"),
            *("--milter", f"up={upstream}"),
            stdin=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        assert child.stderr is not None
        try:
            lines: list[str] = []
            while not any("listening" in line for line in lines):
                line = (await child.stderr.readline()).decode()
                assert line, f"the chain exited before listening: {''.join(lines)}"
                lines.append(line)
            async with AsyncMilterTestClient(target=f"unix:{listen}") as client:
                result = await client.send_message(MESSAGE)
            assert result.delivered is not None
            assert result.delivered.header("X-Up") == "yes"
            # And milterapp send, through the chain.
            eml = sock_dir / "message.eml"
            eml.write_bytes(MESSAGE)
            send = await asyncio.create_subprocess_exec(
                *(sys.executable, "-m", "milterapp", "send", "--spec", f"unix:{listen}"),
                *("--json", str(eml)),
                stdout=asyncio.subprocess.PIPE,
            )
            sent, _ = await send.communicate()
            assert send.returncode == 0
            assert "X-Up" in sent.decode()
            child.send_signal(signal.SIGTERM)
            rest = (await child.stderr.read()).decode()
            assert await child.wait() == 0, rest
        finally:
            if child.returncode is None:
                child.kill()
                await child.wait()
        assert "Traceback" not in rest

    with ServerThread(stamper("X-Up"), "inet:0@[127.0.0.1]") as server:
        run(main(server.spec), 30)
    assert not listen.exists()  # removed at the graceful exit
