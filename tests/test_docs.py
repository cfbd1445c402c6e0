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

Besides: every page of docs/ is linked from docs/index.md, relative links and their
``#anchors`` resolve, and docs/cli.md mentions every subcommand and option.
``python tests/test_docs.py`` prints every block and how it is checked.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib.metadata
import inspect
import io
import re
import shlex
import subprocess
import sys
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
PAGES = sorted(DOCS.glob("*.md"))
FILES = [*PAGES, ROOT / "README.md"]

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


def test_cli_page_documents_every_command_and_option() -> None:
    text = CLI_PAGE.read_text(encoding="utf-8")
    parser = _parser()
    missing = [option for option in parser._option_string_actions if option.startswith("--")]
    missing = [option for option in missing if option != "--help" and option not in text]
    for name, command in _subparsers(parser).items():
        if f"## `milterapp {name}`" not in text:
            missing.append(f"a '## `milterapp {name}`' section")
        missing += [
            f"{name} {option}"
            for option in command._option_string_actions
            if option.startswith("--") and option != "--help" and option not in text
        ]
    assert not missing, f"docs/cli.md does not mention: {missing}"


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


def test_every_page_is_linked_from_the_index() -> None:
    linked = {
        (INDEX.parent / target.partition("#")[0]).resolve()
        for target in _links(INDEX)
        if target.partition("#")[0]
    }
    missing = [p.name for p in PAGES if p != INDEX and p.resolve() not in linked]
    assert not missing, f"docs/index.md does not link to {missing}"


# --- inventory -----------------------------------------------------------------------------


def _how_checked(block: Block) -> str:
    if block.lang in PYTHON:
        return {"run": "runs", "module": "runs (as a module)", "pytest": "runs under pytest"}.get(
            block.verb or "", "compiles"
        )
    if block.lang in SHELL:
        commands = _milterapp_commands(block)
        return f"{len(commands)} milterapp command(s) parsed" if commands else "not checked"
    return "not checked"


if __name__ == "__main__":
    for block in BLOCKS:
        print(f"{block.name:<36} {block.lang or '(none)':<8} {_how_checked(block)}")
