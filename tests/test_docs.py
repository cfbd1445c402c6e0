"""Every code block in docs/*.md and README.md is checked, so the documentation keeps working.

- ```python blocks must compile (top-level ``await`` allowed, as in snippets). A block marked
  with an HTML comment on the line before its fence runs too:

  ``<!-- test: run -->``
      executed as a fresh module; then each of its module-level ``test_*`` functions that takes
      no argument is called. It must not serve (``app.run()``, ``app.serve()``) outside an
      ``if __name__ == "__main__":`` block.
  ``<!-- test: module NAME -->``
      the same, and the later blocks of that page can ``import NAME`` (a page's ``mymilter.py``).
  ``<!-- test: pytest -->``
      run by pytest in a subprocess, with milterapp's plugin, for examples that use its fixtures.

- ```sh, ```bash, ```shell and ```console blocks (``$ `` lines only): every ``milterapp``
  command (also ``python -m milterapp``) must use a subcommand and options that the parser of
  ``milterapp.cli`` has, and parse.
- ```ini, ```m4 and ```text blocks, and blocks without a language (configuration, output, hex
  dumps) are not checked; any other language fails until it is given a rule here.

Besides: every page of docs/ is linked from docs/index.md and from README.md, relative links
and their ``#anchors`` resolve, and docs/cli.md mentions every subcommand and option.

docs/quickstart.md is also followed as a newcomer would, in a fresh virtual environment
(``test_quickstart_walkthrough``): its shell commands run in page order; a block introduced by
"Save this as `NAME`" is saved as NAME first; a ```console block's output must be the one shown;
"another terminal" in the prose starts a shell of its own; ``milterapp run`` is served in the
background and stopped with SIGTERM at the end.
``python tests/test_docs.py`` prints every block and how it is checked.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib.metadata
import inspect
import io
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
import types
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from milterapp.cli import _parser

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
INDEX = DOCS / "index.md"
CLI_PAGE = DOCS / "cli.md"
README = ROOT / "README.md"
PAGES = sorted(DOCS.glob("*.md"))
FILES = [*PAGES, README]

PYTHON = frozenset({"python", "py"})
SHELL = frozenset({"sh", "bash", "shell", "console"})
NOT_CHECKED = frozenset({"", "text", "ini", "m4"})
VERBS = frozenset({"run", "module", "pytest"})
#: Calls that would block a test: serving forever. ``asyncio.run(...)`` is fine.
BLOCKING = frozenset({"run", "serve", "record_sync", "run_forever"})
SHELL_SEPARATORS = frozenset({"&&", "||", ";", "|", "&", "(", ")"})

_FENCE = re.compile(r"^(?P<indent> *)(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`]*)$")
_MARKER = re.compile(r"^\s*<!--\s*test:\s*(?P<verb>\w+)(?:\s+(?P<arg>\S+))?\s*-->\s*$")
_LINK = re.compile(r"\[[^\]]*\]\((?P<target>[^)\s]+)\)")
_CODE_SPAN = re.compile(r"(`+).*?\1")
_HEADING = re.compile(r"^(#{1,6})\s+(?P<text>.+?)\s*#*\s*$")
_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


@dataclass(frozen=True)
class Block:
    """One fenced code block: where it is, its language, its text and its test marker."""

    path: Path
    line: int  # of the opening fence, 1-based
    lang: str
    code: str
    verb: str | None = None
    arg: str | None = None

    @property
    def name(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"

    @property
    def source(self) -> str:
        """The code, shifted so that tracebacks give line numbers of the page."""
        return "\n" * self.line + self.code


def _scan(path: Path) -> tuple[list[Block], list[str]]:
    """Return the page's code blocks, and its lines with code blocks blanked out."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    prose: list[str] = []
    index = 0
    while index < len(lines):
        opening = _FENCE.match(lines[index])
        if opening is None:
            prose.append(lines[index])
            index += 1
            continue
        indent, fence = len(opening["indent"]), opening["fence"]
        info = opening["info"].strip()
        marker = _MARKER.match(lines[index - 1]) if index else None
        body: list[str] = []
        end = index + 1
        while end < len(lines):
            stripped = lines[end].strip()
            if stripped.startswith(fence) and not stripped.strip(fence[0]):
                break
            text = lines[end]
            body.append(text[min(indent, len(text) - len(text.lstrip(" "))) :])
            end += 1
        blocks.append(
            Block(
                path=path,
                line=index + 1,
                lang=info.split()[0].lower() if info else "",
                code="\n".join(body) + "\n",
                verb=marker["verb"] if marker else None,
                arg=marker["arg"] if marker else None,
            )
        )
        prose.extend([""] * (end + 1 - index))
        index = end + 1
    return blocks, prose


def _blocks() -> list[Block]:
    return [block for path in FILES for block in _scan(path)[0]]


BLOCKS = _blocks()
PYTHON_BLOCKS = [b for b in BLOCKS if b.lang in PYTHON]
EXECUTED = [b for b in PYTHON_BLOCKS if b.verb in ("run", "module")]
PYTEST_BLOCKS = [b for b in PYTHON_BLOCKS if b.verb == "pytest"]
SHELL_BLOCKS = [b for b in BLOCKS if b.lang in SHELL]


def _ids(blocks: list[Block]) -> list[str]:
    return [block.name for block in blocks]


# --- every block has a rule ------------------------------------------------------------------


def test_every_block_language_has_a_rule() -> None:
    unknown = [
        f"{b.name}: ```{b.lang}" for b in BLOCKS if b.lang not in PYTHON | SHELL | NOT_CHECKED
    ]
    assert not unknown, f"give these blocks a known language or a rule in {__file__}: {unknown}"


def test_markers_are_known_and_on_python_blocks() -> None:
    problems = []
    for path in FILES:
        lines = path.read_text(encoding="utf-8").splitlines()
        for number, line in enumerate(lines, 1):
            if _MARKER.match(line) and not (number < len(lines) and _FENCE.match(lines[number])):
                problems.append(
                    f"{path.relative_to(ROOT)}:{number}: a marker not followed by a fence"
                )
    for block in BLOCKS:
        if block.verb is None:
            continue
        if block.verb not in VERBS:
            problems.append(f"{block.name}: unknown marker 'test: {block.verb}'")
        elif block.lang not in PYTHON:
            problems.append(f"{block.name}: 'test: {block.verb}' marks a ```{block.lang} block")
        elif (block.verb == "module") != (block.arg is not None):
            problems.append(f"{block.name}: 'test: module NAME' and only it takes an argument")
    assert not problems


def test_the_docs_have_runnable_blocks() -> None:
    # Guards the scanner itself: a broken fence or marker pattern would check nothing.
    assert len(EXECUTED) >= 5
    assert PYTEST_BLOCKS
    assert any(_milterapp_commands(block) for block in SHELL_BLOCKS)


# --- python --------------------------------------------------------------------------------


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=_ids(PYTHON_BLOCKS))
def test_python_block_compiles(block: Block) -> None:
    compile(block.source, str(block.path), "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)


def _main_guard(node: ast.AST) -> bool:
    """``if __name__ == "__main__":``"""
    return (
        isinstance(node, ast.If)
        and isinstance(node.test, ast.Compare)
        and isinstance(node.test.left, ast.Name)
        and node.test.left.id == "__name__"
        and any(
            isinstance(c, ast.Constant) and c.value == "__main__" for c in node.test.comparators
        )
    )


def _blocking_calls(tree: ast.AST) -> Iterator[str]:
    for node in ast.iter_child_nodes(tree):
        if _main_guard(node):
            continue
        if isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Attribute) and func.attr in BLOCKING:
                receiver = func.value
                if not (isinstance(receiver, ast.Name) and receiver.id == "asyncio"):
                    yield f"line {node.lineno}: .{func.attr}()"
            elif isinstance(func, ast.Name) and func.id in BLOCKING:
                yield f"line {node.lineno}: {func.id}()"
        yield from _blocking_calls(node)


def _execute(block: Block, name: str, patch: pytest.MonkeyPatch) -> types.ModuleType:
    """Run the block as a fresh module called ``name``, importable while ``patch`` lasts."""
    module = types.ModuleType(name)
    module.__file__ = str(block.path)
    patch.setitem(sys.modules, name, module)  # dataclasses and pydantic look it up
    code = compile(block.source, str(block.path), "exec")
    exec(code, module.__dict__)  # noqa: S102 - running our own documentation is the point
    return module


def _page_modules(block: Block) -> list[Block]:
    """The ``module NAME`` blocks of the same page that come before ``block``."""
    return [
        b for b in EXECUTED if b.path == block.path and b.verb == "module" and b.line < block.line
    ]


@pytest.mark.parametrize("block", EXECUTED, ids=_ids(EXECUTED))
def test_runnable_block_runs(block: Block, monkeypatch: pytest.MonkeyPatch) -> None:
    blocking = list(_blocking_calls(ast.parse(block.source)))
    assert not blocking, (
        f"{block.name} is marked to run but serves forever ({', '.join(blocking)}): put that in "
        "an `if __name__ == '__main__':` block or drop the marker (compile-only)"
    )
    with monkeypatch.context() as patch:
        for earlier in _page_modules(block):
            assert earlier.arg is not None
            _execute(earlier, earlier.arg, patch)
        name = block.arg or f"docs_block_{block.line}"
        module = _execute(block, name, patch)
        for attribute, value in vars(module).items():
            if not (attribute.startswith("test_") and inspect.isfunction(value)):
                continue
            if value.__module__ != name:
                continue  # imported, not defined here
            parameters = inspect.signature(value).parameters
            assert not parameters, (
                f"{block.name}: {attribute} takes fixtures {list(parameters)}; "
                "mark the block 'test: pytest' instead"
            )
            value()


def _plugin_installed() -> bool:
    return any(
        entry.value == "milterapp.testing.plugin"
        for entry in importlib.metadata.entry_points(group="pytest11")
    )


@pytest.mark.parametrize("block", PYTEST_BLOCKS, ids=_ids(PYTEST_BLOCKS))
def test_pytest_block_passes(block: Block, tmp_path: Path) -> None:
    for earlier in _page_modules(block):
        (tmp_path / f"{earlier.arg}.py").write_text(earlier.code, encoding="utf-8")
    (tmp_path / "pytest.ini").write_text("[pytest]\nfilterwarnings = error\n", encoding="utf-8")
    (tmp_path / "test_docs_block.py").write_text(block.code, encoding="utf-8")
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    if not _plugin_installed():  # an installation older than the entry point
        command += ["-p", "milterapp.testing.plugin"]
    result = subprocess.run(  # noqa: S603 - our own interpreter on our own files
        [*command, "test_docs_block.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, f"{block.name} fails under pytest:\n{result.stdout}"


# --- shell ---------------------------------------------------------------------------------


def _command_lines(block: Block) -> Iterator[str]:
    lines = block.code.splitlines()
    if block.lang == "console":
        lines = [line[2:] for line in lines if line.startswith("$ ")]
    joined = ""
    for line in lines:
        if line.rstrip().endswith("\\"):
            joined += line.rstrip()[:-1] + " "
            continue
        joined += line
        if joined.strip() and not joined.lstrip().startswith("#"):
            yield joined
        joined = ""


def _simple_commands(line: str) -> Iterator[list[str]]:
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    command: list[str] = []
    for token in lexer:
        if token in SHELL_SEPARATORS:
            if command:
                yield command
            command = []
        else:
            command.append(token)
    if command:
        yield command


def _milterapp_args(words: list[str]) -> list[str] | None:
    """The arguments after ``milterapp`` (or ``python -m milterapp``); None for other commands."""
    while words and (_ASSIGNMENT.match(words[0]) or words[0] in ("sudo", "exec", "env")):
        words = words[1:]
    if not words:
        return None
    program = Path(words[0]).name
    if program == "milterapp":
        return words[1:]
    if program.startswith("python") and words[1:3] == ["-m", "milterapp"]:
        return words[3:]
    return None


def _milterapp_commands(block: Block) -> list[list[str]]:
    found = []
    for line in _command_lines(block):
        for words in _simple_commands(line):
            args = _milterapp_args(words)
            if args is not None:
                found.append(args)
    return found


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("milterapp's parser has no subcommands")


def _unknown_options(args: list[str]) -> list[str]:
    parser = _parser()
    if args and not args[0].startswith("-"):
        commands = _subparsers(parser)
        if args[0] not in commands:
            return [f"subcommand {args[0]!r} (known: {', '.join(commands)})"]
        parser, args = commands[args[0]], args[1:]
    known = parser._option_string_actions
    return [
        f"option {word.partition('=')[0]!r} of {parser.prog!r}"
        for word in args
        if word.startswith("--") and word != "--" and word.partition("=")[0] not in known
    ]


def _parse_error(args: list[str]) -> str | None:
    """What argparse says about ``milterapp ARGS``; None when they parse (or ask for help)."""
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors), contextlib.redirect_stdout(io.StringIO()):
            _parser().parse_args(args)
    except SystemExit as stop:
        if stop.code != 0:
            return errors.getvalue().strip() or f"exit status {stop.code}"
    return None


@pytest.mark.parametrize("block", SHELL_BLOCKS, ids=_ids(SHELL_BLOCKS))
def test_milterapp_commands_exist(block: Block) -> None:
    for args in _milterapp_commands(block):
        command = " ".join(["milterapp", *args])
        unknown = _unknown_options(args)
        assert not unknown, f"{block.name}: `{command}` uses an unknown {', '.join(unknown)}"
        error = _parse_error(args)
        assert error is None, f"{block.name}: `{command}` does not parse: {error}"


def _cli_sections(text: str) -> dict[str, str]:
    """docs/cli.md's text under each ``## `milterapp NAME` `` heading, up to the next ``## ``."""
    sections: dict[str, str] = {}
    for part in re.split(r"^(?=## )", text, flags=re.MULTILINE):
        heading = re.match(r"## `milterapp (\w+)`", part)
        if heading:
            sections[heading.group(1)] = part
    return sections


def test_cli_page_documents_every_command_and_option() -> None:
    text = CLI_PAGE.read_text(encoding="utf-8")
    parser = _parser()
    missing = [option for option in parser._option_string_actions if option.startswith("--")]
    missing = [option for option in missing if option != "--help" and option not in text]
    sections = _cli_sections(text)
    for name, command in _subparsers(parser).items():
        if name not in sections:
            missing.append(f"a '## `milterapp {name}`' section")
            continue
        # Each option in its own command's section, not merely somewhere on the page; a
        # command that takes "every server option of `milterapp run`" may leave those to
        # run's section.
        section = sections[name]
        if "every server option of `milterapp run`" in section:
            section += sections.get("run", "")
        missing += [
            f"{name} {option}"
            for option in command._option_string_actions
            if option.startswith("--") and option != "--help" and option not in section
        ]
    assert not missing, f"docs/cli.md does not mention: {missing}"


def test_every_cli_option_and_argument_has_a_help_text() -> None:
    parser = _parser()
    silent = [
        f"{name} {' '.join(action.option_strings) or action.dest}"
        for name, command in _subparsers(parser).items()
        for action in command._actions
        if not action.help and not isinstance(action, argparse._SubParsersAction)
    ]
    assert not silent, f"options without a help text: {silent}"


# --- links ---------------------------------------------------------------------------------


def _slug(heading: str) -> str:
    """The anchor a heading gets on GitHub: lower case, punctuation dropped, spaces to '-'."""
    text = _LINK.sub(lambda m: m.group(0).split("](")[0][1:], heading)
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    anchors = set()
    for line in _scan(path)[1]:
        heading = _HEADING.match(line)
        if heading is None:
            continue
        slug = _slug(heading["text"])
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if not count else f"{slug}-{count}")
    return anchors


def _links(path: Path) -> Iterator[str]:
    for line in _scan(path)[1]:
        for match in _LINK.finditer(_CODE_SPAN.sub("", line)):
            yield match["target"]


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(ROOT)) for p in FILES])
def test_relative_links_resolve(path: Path) -> None:
    broken = []
    for target in _links(path):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):
            continue  # https:, mailto:
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        if not linked.exists():
            broken.append(target)
        elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
            broken.append(f"{target} (no such heading)")
    assert not broken, f"{path.relative_to(ROOT)} has broken links: {broken}"


@pytest.mark.parametrize("listing", [INDEX, README], ids=["docs/index.md", "README.md"])
def test_every_page_is_linked_from(listing: Path) -> None:
    linked = {
        (listing.parent / target.partition("#")[0]).resolve()
        for target in _links(listing)
        if target.partition("#")[0]
    }
    missing = [p.name for p in PAGES if p != listing and p.resolve() not in linked]
    assert not missing, f"{listing.relative_to(ROOT)} does not link to {missing}"


# --- the quickstart, followed in a fresh virtual environment ---------------------------------

QUICKSTART = DOCS / "quickstart.md"
#: The port the quickstart serves on. The walk-through serves on a free port instead (the one
#: change it makes to the page's commands), so that it never meets a milter already there.
QUICKSTART_PORT = "10025"
#: What the walk-through copies of the checkout: enough to build and install milterapp.
CHECKOUT = ("pyproject.toml", "README.md", "LICENSE", "milterapp")
_SAVE_AS = re.compile(r"[Ss]ave\s+this\s+as\s+`(?P<name>[^`]+)`")
_ANOTHER_TERMINAL = re.compile(r"another\s+terminal", re.IGNORECASE)
#: Simple commands whose effect lasts in the shell that ran them. Each command of the page runs
#: in a shell of its own, after the earlier ones of these from the same terminal.
SHELL_STATE = frozenset({".", "source", "cd", "export"})
COMMAND_TIMEOUT = 120
BASH = shutil.which("bash") or "/bin/bash"


@dataclass(frozen=True)
class Step:
    """What one block of the quickstart asks the reader to do."""

    block: Block
    save_as: str | None  # the file the prose says to save the block as
    new_terminal: bool  # the prose moves to another terminal
    commands: tuple[tuple[str, str | None], ...]  # command lines, with the output shown


def _with_prose(path: Path) -> Iterator[tuple[Block, str]]:
    """Each block of the page, with the prose between the previous block and it."""
    lines = path.read_text(encoding="utf-8").splitlines()
    start = 0
    for block in _scan(path)[0]:
        yield block, "\n".join(lines[start : block.line - 1])
        start = block.line + block.code.count("\n") + 1  # past the closing fence


def _console_commands(block: Block) -> Iterator[tuple[str, str]]:
    """``$ `` lines of a ```console block, each with the output shown under it."""
    session: list[tuple[str, list[str]]] = []
    for line in block.code.splitlines():
        if line.startswith("$ "):
            session.append((line[2:], []))
        elif session:
            session[-1][1].append(line)
    for command, output in session:
        yield command, "\n".join(output)


def _quickstart_steps() -> list[Step]:
    steps = []
    for block, prose in _with_prose(QUICKSTART):
        commands: list[tuple[str, str | None]] = []
        if block.lang == "console":
            commands = list(_console_commands(block))
        elif block.lang in SHELL:
            commands = [(line, None) for line in _command_lines(block)]
        names = _SAVE_AS.findall(prose)
        save_as = names[-1] if names and block.lang not in SHELL else None
        new_terminal = bool(_ANOTHER_TERMINAL.search(prose))
        steps.append(Step(block, save_as, new_terminal, tuple(commands)))
    return steps


def _words(line: str) -> list[list[str]]:
    return list(_simple_commands(line))


def _venv_directory(steps: list[Step]) -> str:
    """Where the page's ``python3 -m venv DIR`` creates the environment."""
    for step in steps:
        for line, _ in step.commands:
            for words in _words(line):
                if Path(words[0]).name.startswith("python") and words[1:3] == ["-m", "venv"]:
                    return [word for word in words[3:] if not word.startswith("-")][-1]
    raise AssertionError("docs/quickstart.md no longer creates a virtual environment")


def _requirements(steps: list[Step]) -> list[str]:
    """What the page's installs need: milterapp's dependencies and build backend, the extras it
    installs, and the packages it names (``pip install pytest``)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    needed = [*project["build-system"]["requires"], *project["project"]["dependencies"]]
    for step in steps:
        for line, _ in step.commands:
            for words in _words(line):
                if "install" not in words or not any(Path(w).name == "pip" for w in words):
                    continue
                for word in words[words.index("install") + 1 :]:
                    extras = re.fullmatch(r"\.\[(?P<extras>[^\]]+)\]", word)
                    if extras:
                        optional = project["project"]["optional-dependencies"]
                        for extra in extras["extras"].split(","):
                            needed += optional[extra.strip()]
                    elif not word.startswith(("-", ".", "/")):
                        needed.append(word)
    return needed


def _link_installed(requirements: list[str], site: Path) -> list[str]:
    """Link the installed distributions that ``requirements`` need (and theirs, recursively)
    into the directory ``site``; return the requirements that nothing installed satisfies."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    missing, seen, pending = [], set(), list(requirements)
    while pending:
        requirement = Requirement(pending.pop())
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue
        try:
            distribution = importlib.metadata.distribution(requirement.name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(str(requirement))
            continue
        if not requirement.specifier.contains(distribution.version, prereleases=True):
            missing.append(f"{requirement} ({distribution.version} is installed)")
            continue
        name = canonicalize_name(distribution.metadata["Name"])
        if name in seen:
            continue
        seen.add(name)
        pending += distribution.requires or []
        base = Path(str(distribution.locate_file("")))
        for top in {file.parts[0] for file in distribution.files or []} - {"..", "__pycache__"}:
            if not (site / top).exists():
                (site / top).symlink_to(base / top)
    return missing


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


class _Shells:
    """The reader's terminals, played by one ``bash`` per command in the page's environment."""

    def __init__(self, checkout: Path, env: dict[str, str], logs: Path) -> None:
        self.checkout, self.env, self.logs = checkout, env, logs
        self.state: list[str] = []  # the current terminal's lasting commands (activate, cd)
        self.servers: list[tuple[str, subprocess.Popen[bytes], Path]] = []

    def new_terminal(self) -> None:
        self.state = []

    def _script(self, command: str) -> str:
        return "".join(f"{earlier} || exit 97\n" for earlier in self.state) + command

    def _remember(self, command: str) -> None:
        self.state += [shlex.join(w) for w in _simple_commands(command) if w[0] in SHELL_STATE]

    def run(self, command: str, shown: str | None) -> None:
        """Run ``command`` to its end: it must succeed, and print ``shown`` if given."""
        result = subprocess.run(  # noqa: S603 - the page's own command
            [BASH, "-c", self._script(command)],
            cwd=self.checkout,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT,
            check=False,
        )
        report = (
            f"`{command}` exited {result.returncode}\n--- stdout ---\n{result.stdout[-5000:]}"
            f"\n--- stderr ---\n{result.stderr[-5000:]}"
        )
        assert result.returncode == 0, report
        if shown is not None:
            printed = [text.rstrip() for text in result.stdout.rstrip("\n").splitlines()]
            expected = [text.rstrip() for text in shown.rstrip("\n").splitlines()]
            assert printed == expected, f"not the output the page shows:\n{report}"
        self._remember(command)

    def serve(self, command: str, port: int) -> None:
        """Start ``command``, a server, in the background; wait until it accepts on ``port``."""
        log = self.logs / f"server-{len(self.servers)}.log"
        with log.open("wb") as output:
            server = subprocess.Popen(  # noqa: S603 - the page's own command
                [BASH, "-c", self._script(f"exec {command}")],
                cwd=self.checkout,
                env=self.env,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.servers.append((command, server, log))
        deadline = time.monotonic() + 30
        while not _accepts(port):
            running = server.poll() is None and time.monotonic() < deadline
            assert running, f"`{command}` did not start serving:\n{log.read_text()}"
            time.sleep(0.05)
        self._remember(command)

    def stop_servers(self) -> list[str]:
        """SIGTERM each server ("stops cleanly on Ctrl-C or SIGTERM"); what went wrong."""
        problems = []
        for command, server, log in self.servers:
            if server.poll() is None:
                server.send_signal(signal.SIGTERM)
            try:
                server.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait(15)
                problems.append(f"`{command}` did not stop on SIGTERM")
                continue
            if server.returncode != 0:
                problems.append(f"`{command}` exited {server.returncode}:\n{log.read_text()}")
        return problems


def _checkout_copy(target: Path) -> None:
    """What of the checkout the quickstart builds from, copied: the build must not touch ours."""
    target.mkdir()
    for name in CHECKOUT:
        source = ROOT / name
        if source.is_dir():
            ignore = shutil.ignore_patterns("__pycache__", "*.so")  # *.so: a mypyc build
            shutil.copytree(source, target / name, ignore=ignore)
        elif source.exists():
            shutil.copy2(source, target / name)


def test_quickstart_walkthrough(tmp_path: Path) -> None:
    """docs/quickstart.md, followed command by command in a fresh virtual environment.

    Nothing is downloaded. The environment the page creates is fresh but for one ``.pth`` file
    that adds a directory of links to the distributions this interpreter has installed and the
    page needs (milterapp's dependencies, its build backend, pytest); pip runs with no package
    index and without build isolation, so ``pip install .`` builds milterapp with the hatchling
    installed here and finds every dependency already satisfied. Where one of them is not
    installed (hatchling: the test extra brings it) the page cannot be followed offline: the
    test skips, saying so, and fails under CI.
    """
    steps = _quickstart_steps()
    installed = tmp_path / "installed"
    installed.mkdir()
    missing = _link_installed(_requirements(steps), installed)
    if missing:
        reason = (
            f"docs/quickstart.md cannot be followed offline: {', '.join(missing)} not installed "
            f"in {sys.prefix} (pip would have to download it)"
        )
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)

    checkout = tmp_path / "checkout"
    _checkout_copy(checkout)
    tools = tmp_path / "bin"  # `python3` is the Python of these tests; nothing else of ours
    tools.mkdir()
    (tools / "python3").symlink_to(getattr(sys, "_base_executable", sys.executable))
    env = {
        "PATH": f"{tools}:/usr/bin:/bin",
        "HOME": str(tmp_path / "home"),
        "LANG": "C.UTF-8",
        "PIP_CONFIG_FILE": os.devnull,  # none of this machine's pip configuration
        "PIP_NO_INDEX": "1",
        "PIP_NO_BUILD_ISOLATION": "0",  # pip reads its "no-" options inverted: 0 turns it on
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
    }
    # The environment the page's `python3 -m venv` will (re)create, made first with the .pth.
    venv = checkout / _venv_directory(steps)
    subprocess.run(  # noqa: S603 - our own interpreter
        [str(tools / "python3"), "-m", "venv", "--without-pip", str(venv)],
        env=env,
        check=True,
        timeout=COMMAND_TIMEOUT,
    )
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    (venv / "lib" / version / "site-packages" / "_installed_here.pth").write_text(f"{installed}\n")

    port = _free_port()
    shells = _Shells(checkout, env, tmp_path)
    ran = 0
    try:
        for step in steps:
            if step.new_terminal:
                shells.new_terminal()
            if step.save_as is not None:
                (checkout / step.save_as).write_text(step.block.code, encoding="utf-8")
            for line, shown in step.commands:
                command = line.replace(QUICKSTART_PORT, str(port))
                args = [_milterapp_args(words) for words in _simple_commands(command)]
                if len(args) == 1 and args[0] and args[0][0] == "run":  # serves until stopped
                    shells.serve(command, port)
                else:
                    shells.run(command, shown)
                ran += 1
    finally:
        problems = shells.stop_servers()
    assert not problems, "\n".join(problems)
    assert shells.servers, "docs/quickstart.md no longer runs the milter"
    assert ran >= 5, f"only {ran} commands of docs/quickstart.md ran"


# --- inventory -----------------------------------------------------------------------------


def _how_checked(block: Block) -> str:
    if block.lang in PYTHON:
        return {"run": "runs", "module": "runs (as a module)", "pytest": "runs under pytest"}.get(
            block.verb or "", "compiles"
        )
    walked = " (run by the quickstart walk-through)" if block.path == QUICKSTART else ""
    if block.lang in SHELL:
        commands = _milterapp_commands(block)
        parsed = f"{len(commands)} milterapp command(s) parsed" if commands else "not parsed"
        return parsed + walked
    return "not checked"


if __name__ == "__main__":
    for block in BLOCKS:
        print(f"{block.name:<36} {block.lang or '(none)':<8} {_how_checked(block)}")
