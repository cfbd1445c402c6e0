"""Enforce milterapp's architecture: layered one-way imports, no circles, a sans-IO core, a
small top level, package ``__init__`` files that only re-export, and a tidy public API.

Every module under ``milterapp/`` is parsed with :mod:`ast` (not imported). Every import
counts: at module level, inside functions (lazy ones) and under ``if TYPE_CHECKING:`` alike.

- **Layers.** ``LAYERS`` lists the modules lowest first; a module may import modules of its
  own layer or lower ones, never a higher one. The server's own modules are ordered too.
- **No circles.** Importing ``a.b.c`` first runs ``a.b``'s ``__init__``: an import of a
  submodule of another package is also an edge to that package. The graph of every edge
  must have no cycle.

The tests discover modules at run time: a module missing from ``LAYERS`` fails until it is
given a layer, so a new module is a deliberate decision about where it belongs. See
docs/architecture.md.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

# --------------------------------------------------------------------------------------------
# The layer table: the single place that says which module sits where (lowest layer first).
# A name ending in ".*" stands for every module of that package but its __init__.
# --------------------------------------------------------------------------------------------

LAYERS: list[list[str]] = [
    # Foundations, standard library only.
    ["milterapp.errors", "milterapp.constants"],
    # Models and values.
    ["milterapp.smtpvalues"],
    ["milterapp.events", "milterapp.replies", "milterapp.spec"],
    # The sans-IO core, in its own order; its __init__ re-exports it.
    ["milterapp.protocol.stages", "milterapp.protocol.framing", "milterapp.protocol.payload"],
    ["milterapp.protocol.commands", "milterapp.protocol.responses"],
    ["milterapp.protocol.codec", "milterapp.protocol.negotiation"],
    ["milterapp.protocol.macros", "milterapp.protocol.answers"],
    ["milterapp.protocol.machine", "milterapp.protocol.mta"],
    ["milterapp.protocol"],
    # What a handler sees, and the App's options (which the server reads too).
    ["milterapp.message"],
    ["milterapp.context", "milterapp.config"],
    # The server: it serves any Servable and never imports the App.
    [
        "milterapp.server.servable",
        "milterapp.server.limits",
        "milterapp.server.writes",
        "milterapp.server.loops",
        "milterapp.server.logfmt",
        "milterapp.server.logsetup",
        "milterapp.server.acceptor",
        "milterapp.server.outcomes",
        "milterapp.server.notify",
        "milterapp.server.check",
        "milterapp.server.metrics",
    ],
    ["milterapp.server.options", "milterapp.server.deadlines", "milterapp.server.responder"],
    ["milterapp.server.listener", "milterapp.server.connection"],
    ["milterapp.server.server"],
    ["milterapp.server.workers"],
    ["milterapp.server.arguments", "milterapp.server.main"],
    ["milterapp.server"],
    # Chaining: the MTA side of the protocol over asyncio, calling upstream milters.
    ["milterapp.chain.*"],
    ["milterapp.chain"],
    # The App on top of the server (as Flask's app.run() on werkzeug).
    ["milterapp.handlers"],
    ["milterapp.app"],
    # Tools built on the App and the server.
    ["milterapp.testing.*", "milterapp.testing.recording.*"],
    ["milterapp.testing.recording", "milterapp.testing"],
    ["milterapp.load.*", "milterapp.demo.*"],
    ["milterapp.load", "milterapp.demo"],
    # The command line, and the package, which re-exports the public API.
    [
        "milterapp.cli",
        "milterapp.commands.*",
        "milterapp.commands",
        "milterapp.__main__",
        "milterapp",
    ],
]

#: The sans-IO core: these packages never imported by it, not even under TYPE_CHECKING.
PROTOCOL_FORBIDDEN_PACKAGES = frozenset({"asyncio", "socket", "selectors", "structlog"})
#: Most modules at the top of the package, besides __init__ and __main__.
MAX_TOP_LEVEL_MODULES = 12

# --------------------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parent.parent
PACKAGE_DIR = ROOT / "milterapp"
PROTOCOL_PACKAGE = "milterapp.protocol"
TABLE_HINT = "add it to LAYERS at the top of tests/test_architecture.py"


@dataclass(frozen=True)
class Import:
    """One import found in a module, with the absolute name of what it imports."""

    module: str
    line: int
    type_checking_only: bool
    in_function: bool = False


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _discover_modules() -> dict[str, Path]:
    paths = sorted(PACKAGE_DIR.rglob("*.py"))
    return {_module_name(p): p for p in paths if "__pycache__" not in p.parts}


MODULES = _discover_modules()
PROTOCOL_MODULES = sorted(
    name for name in MODULES if name == PROTOCOL_PACKAGE or name.startswith(PROTOCOL_PACKAGE + ".")
)
PACKAGES = sorted(name for name, path in MODULES.items() if path.name == "__init__.py")


def _is_package(name: str) -> bool:
    return name in PACKAGES


def layer_of(module: str) -> int | None:
    """Return the layer of a milterapp module (its index in LAYERS), or None if not listed."""
    for index, names in enumerate(LAYERS):
        for name in names:
            if name == module:
                return index
            package = name.removesuffix(".*")
            if package != name and module.rpartition(".")[0] == package and not _is_package(module):
                return index
    return None


def _is_type_checking_test(test: ast.expr) -> bool:
    if isinstance(test, ast.Name):
        return test.id == "TYPE_CHECKING"
    return isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"


def _resolve_from(module: str, node: ast.ImportFrom) -> str:
    """Return the absolute package or module a ``from ... import`` statement reads from."""
    if node.level == 0:
        return node.module or ""
    package = module if _is_package(module) else module.rpartition(".")[0]
    parts = package.split(".")
    if node.level - 1 >= len(parts):
        raise AssertionError(
            f"{module}: relative import beyond the top package, line {node.lineno}"
        )
    base = ".".join(parts[: len(parts) - (node.level - 1)])
    return f"{base}.{node.module}" if node.module else base


def _imported_modules(module: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    source = _resolve_from(module, node)
    targets = []
    for alias in node.names:
        candidate = f"{source}.{alias.name}"
        # ``from milterapp import events`` imports the submodule, not a name of the package.
        targets.append(candidate if candidate in MODULES else source)
    return targets


class _ImportCollector(ast.NodeVisitor):
    def __init__(self, module: str) -> None:
        self.module = module
        self.imports: list[Import] = []
        self._type_checking_depth = 0
        self._function_depth = 0

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        self._function_depth += 1
        self.generic_visit(node)
        self._function_depth -= 1

    def visit_AsyncFunctionDef(self, node: ast.AsyncFunctionDef) -> None:
        self._function_depth += 1
        self.generic_visit(node)
        self._function_depth -= 1

    def visit_If(self, node: ast.If) -> None:
        if not _is_type_checking_test(node.test):
            self.generic_visit(node)
            return
        self.visit(node.test)
        self._type_checking_depth += 1
        for child in node.body:
            self.visit(child)
        self._type_checking_depth -= 1
        for child in node.orelse:  # the ``else`` branch runs for real
            self.visit(child)

    def visit_Import(self, node: ast.Import) -> None:
        self._record(node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        self._record(node)

    def _record(self, node: ast.Import | ast.ImportFrom) -> None:
        guarded = self._type_checking_depth > 0
        for target in _imported_modules(self.module, node):
            self.imports.append(Import(target, node.lineno, guarded, self._function_depth > 0))


def imports_of(module: str) -> list[Import]:
    """Return every import in a module, with the absolute name of what it imports."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    collector = _ImportCollector(module)
    collector.visit(tree)
    return collector.imports


def _is_milterapp(name: str) -> bool:
    return name == "milterapp" or name.startswith("milterapp.")


def _describe(name: str) -> str:
    layer = layer_of(name)
    return f"{name} (layer {layer})" if layer is not None else f"{name} (not in LAYERS)"


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:end]) for end in range(1, len(parts))]


def dependencies(module: str) -> set[str]:
    """The milterapp modules that importing ``module`` runs: what it imports, and the
    ``__init__`` of each package those live in that ``module`` is not already inside."""
    own = {*_ancestors(module), module}
    found: set[str] = set()
    for imp in imports_of(module):
        if not _is_milterapp(imp.module):
            continue
        found.add(imp.module)
        found.update(package for package in _ancestors(imp.module) if package not in own)
    found.discard(module)
    return found


def import_graph() -> dict[str, list[str]]:
    """Each module, with the modules importing it runs."""
    return {module: sorted(dependencies(module) & set(MODULES)) for module in MODULES}


def import_cycles(graph: dict[str, list[str]]) -> list[list[str]]:
    """Every cycle of ``graph``, as the strongly connected components that have one
    (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


# --------------------------------------------------------------------------------------------
# Layering and circles
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("module", sorted(MODULES))
def test_architecture_module_has_a_layer(module: str) -> None:
    assert layer_of(module) is not None, f"{module} has no layer: {TABLE_HINT}"


def test_architecture_layer_table_names_only_existing_modules() -> None:
    stale = [
        name
        for names in LAYERS
        for name in names
        if not (name[:-2] in PACKAGES if name.endswith(".*") else name in MODULES)
    ]
    assert not stale, f"LAYERS names modules that do not exist: {stale}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_architecture_module_imports_only_its_own_layer_or_lower(module: str) -> None:
    own_layer = layer_of(module)
    assert own_layer is not None, f"{module} has no layer: {TABLE_HINT}"
    problems: list[str] = []
    for imp in imports_of(module):  # lazy and TYPE_CHECKING imports count too
        if not _is_milterapp(imp.module):
            continue
        target_layer = layer_of(imp.module)
        if target_layer is None:
            problems.append(f"line {imp.line}: imports unknown module {imp.module}: {TABLE_HINT}")
        elif target_layer > own_layer and not any(f"line {imp.line}:" in p for p in problems):
            problems.append(
                f"line {imp.line}: imports {_describe(imp.module)}, a higher layer; move the "
                "shared code down, or let the higher layer hand it in (as the App is handed "
                "to the server, which only knows the Servable protocol)"
            )
    assert not problems, f"{_describe(module)}:\n  " + "\n  ".join(problems)


def test_architecture_has_no_import_cycles() -> None:
    cycles = import_cycles(import_graph())
    assert not cycles, "modules that import each other, directly or through others:\n  " + (
        "\n  ".join(" <-> ".join(cycle) for cycle in cycles)
    )


def test_architecture_cycle_finder_finds_long_and_short_cycles() -> None:
    graph = {"a": ["b"], "b": ["c"], "c": ["a"], "d": ["e"], "e": ["d"], "f": ["a"], "g": []}
    assert sorted(import_cycles(graph)) == [["a", "b", "c"], ["d", "e"]]


def test_architecture_cycle_finder_sees_a_cycle_through_a_package_init() -> None:
    # events importing a module of a package whose __init__ imports events back would fail
    # at import time although no module imports the other directly: the edge to the package
    # is what makes the cycle visible.
    source = "from milterapp.protocol.machine import MilterConnection\n"
    collector = _ImportCollector("milterapp.events")
    collector.visit(ast.parse(source))
    targets = {imp.module for imp in collector.imports}
    assert targets == {"milterapp.protocol.machine"}
    assert "milterapp.protocol" in _ancestors("milterapp.protocol.machine")
    assert "milterapp.protocol" in dependencies("milterapp.server.responder")


@pytest.mark.parametrize("module", PROTOCOL_MODULES)
def test_architecture_protocol_module_stays_sans_io(module: str) -> None:
    protocol_layer = layer_of(PROTOCOL_PACKAGE)
    assert protocol_layer is not None
    problems = []
    for imp in imports_of(module):
        top_level = imp.module.partition(".")[0]
        if top_level in PROTOCOL_FORBIDDEN_PACKAGES:
            problems.append(
                f"line {imp.line}: imports {imp.module}; the core does no I/O or logging"
            )
        elif _is_milterapp(imp.module):
            target_layer = layer_of(imp.module)
            if target_layer is None or target_layer > protocol_layer:
                problems.append(
                    f"line {imp.line}: imports {_describe(imp.module)}; the core may only "
                    f"import milterapp modules up to layer {protocol_layer}"
                )
    assert not problems, f"{module} must stay sans-IO:\n  " + "\n  ".join(problems)


def test_architecture_server_never_imports_the_app_layer() -> None:
    app_layer = {"milterapp.app", "milterapp.handlers"}
    found = [
        f"{module} line {imp.line}: {imp.module}"
        for module in MODULES
        if module == "milterapp.server" or module.startswith("milterapp.server.")
        for imp in imports_of(module)
        if imp.module in app_layer
    ]
    assert not found, "the server serves a Servable; it must not import the App:\n  " + (
        "\n  ".join(found)
    )


def test_architecture_import_collector_understands_relative_and_guarded_imports() -> None:
    source = (
        "from typing import TYPE_CHECKING\n"
        "from .. import errors\n"
        "from . import framing\n"
        "from .stages import Stage\n"
        "from .. import events\n"
        "import milterapp.replies as r\n"
        "if TYPE_CHECKING:\n"
        "    from milterapp.app import App\n"
        "else:\n"
        "    from milterapp.spec import ConnectionSpec\n"
        "def later():\n"
        "    from milterapp.context import Context\n"
    )
    collector = _ImportCollector("milterapp.protocol.codec")
    collector.visit(ast.parse(source))
    found = {(imp.module, imp.type_checking_only, imp.in_function) for imp in collector.imports}
    assert found == {
        ("typing", False, False),
        ("milterapp.errors", False, False),
        ("milterapp.protocol.framing", False, False),
        ("milterapp.protocol.stages", False, False),
        ("milterapp.events", False, False),
        ("milterapp.replies", False, False),
        ("milterapp.app", True, False),
        ("milterapp.spec", False, False),
        ("milterapp.context", False, True),
    }


# --------------------------------------------------------------------------------------------
# The shape of the package
# --------------------------------------------------------------------------------------------


def test_architecture_top_level_stays_small() -> None:
    top = sorted(
        path.stem for path in PACKAGE_DIR.glob("*.py") if path.stem not in {"__init__", "__main__"}
    )
    assert len(top) <= MAX_TOP_LEVEL_MODULES, (
        f"{len(top)} modules at the top of milterapp/ ({', '.join(top)}); at most "
        f"{MAX_TOP_LEVEL_MODULES}: put what serves one layer in that layer's package"
    )


@pytest.mark.parametrize("package", PACKAGES)
def test_architecture_package_init_only_reexports(package: str) -> None:
    path = MODULES[package]
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    assert ast.get_docstring(tree), f"{path.relative_to(ROOT)} needs a docstring"
    allowed_names = {"__all__", "__version__"}
    extra = []
    for node in tree.body[1:]:
        if isinstance(node, ast.ImportFrom | ast.Import):
            continue
        if isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if all(isinstance(t, ast.Name) and t.id in allowed_names for t in targets):
                continue
        extra.append(f"line {node.lineno}: {ast.unparse(node).splitlines()[0]}")
    assert not extra, (
        f"{path.relative_to(ROOT)} must only re-export (imports and __all__); move this into "
        "a module of the package:\n  " + "\n  ".join(extra)
    )


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def _public_api(package_name: str = "milterapp") -> list[str]:
    package = importlib.import_module(package_name)
    names = getattr(package, "__all__", None)
    assert isinstance(names, list), f"{package_name}/__init__.py must define __all__ as a list"
    return names


def _ruff_sort_key(name: str) -> tuple[int, list[int | str]]:
    """Sort like ruff's RUF022: CONSTANTS, then Classes, then the rest, each naturally."""
    if len(name) > 1 and name.isupper():
        category = 0
    elif name[:1].isupper():
        category = 1
    else:
        category = 2
    natural = [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]
    return category, natural


@pytest.mark.parametrize("package", PACKAGES)
def test_architecture_public_names_resolve(package: str) -> None:
    module = importlib.import_module(package)
    missing = [name for name in _public_api(package) if not hasattr(module, name)]
    assert not missing, f"{package}.__all__ names that do not resolve: {missing}"


def test_architecture_public_classes_and_functions_have_docstrings() -> None:
    package = importlib.import_module("milterapp")
    undocumented = []
    for name in _public_api():
        obj = getattr(package, name, None)
        if inspect.isclass(obj):
            doc = vars(obj).get("__doc__")  # a class must not borrow its base's docstring
        elif inspect.isroutine(obj):
            doc = obj.__doc__
        else:
            continue
        if not (isinstance(doc, str) and doc.strip()):
            undocumented.append(name)
    assert not undocumented, f"public classes and functions without a docstring: {undocumented}"


@pytest.mark.parametrize("package", PACKAGES)
def test_architecture_all_is_sorted(package: str) -> None:
    names = _public_api(package)
    expected = sorted(names, key=_ruff_sort_key)
    assert names == expected, (
        f"{package}.__all__ is not sorted (the order of ruff's RUF022: `ruff check --fix` "
        f"sorts it); expected {expected}"
    )
    duplicates = sorted({name for name in names if names.count(name) > 1})
    assert not duplicates, f"{package}.__all__ lists names twice: {duplicates}"


def test_architecture_exceptions_are_public_as_a_family() -> None:
    # The packet errors are protocol-level: public from milterapp.protocol, both of them.
    top, protocol = set(_public_api()), set(_public_api(PROTOCOL_PACKAGE))
    packet_errors = {"FrameTooLargeError", "LimitExceededError"}
    assert not packet_errors & top
    assert packet_errors <= protocol


def test_architecture_package_ships_py_typed() -> None:
    assert (PACKAGE_DIR / "py.typed").is_file(), "milterapp/py.typed is missing (PEP 561)"
