"""Enforce milterapp's architecture: one-way imports, a sans-IO core, a tidy public API.

Every module under ``milterapp/`` is parsed with :mod:`ast` (not imported) and its imports are
checked against ``LAYERS`` below: a module may import milterapp modules of its own layer or a
lower one, never a higher one. Imports inside ``if TYPE_CHECKING:`` blocks are exempt, because
they never run. Modules under ``milterapp/protocol/`` are held to a stricter rule, with no
exemption: no I/O or logging libraries and nothing from layer 3 upwards.

The tests discover modules at run time, so new modules are checked as soon as they exist; a
module missing from ``LAYERS`` fails until it is given a layer. See docs/architecture.md.
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
# --------------------------------------------------------------------------------------------

LAYERS: dict[str, int] = {
    # 0: foundations, stdlib only.
    "milterapp.errors": 0,
    "milterapp.protocol.constants": 0,
    # The protocol package __init__ is docstring-only (tested below), so importing it is free.
    "milterapp.protocol": 0,
    # 1: models and pure helpers.
    "milterapp.smtpvalues": 1,
    "milterapp.events": 1,
    "milterapp.replies": 1,
    "milterapp.spec": 1,
    "milterapp.limits": 1,
    "milterapp.serveroptions": 1,
    # 2: the sans-IO core. Every other module under milterapp/protocol/ is layer 2 as well.
    "milterapp.protocol.framing": 2,
    "milterapp.protocol.codec": 2,
    "milterapp.protocol.negotiation": 2,
    "milterapp.protocol.machine": 2,
    "milterapp.protocol.macros": 2,
    # 3 to 6: the framework, its drivers and its command line.
    "milterapp.context": 3,
    "milterapp.handlers": 4,
    "milterapp.app": 4,
    "milterapp.dispatch": 4,
    "milterapp.server": 5,
    "milterapp.listener": 5,
    "milterapp.acceptor": 5,
    "milterapp.session": 5,
    "milterapp.endings": 5,
    "milterapp.steps": 5,
    "milterapp.deadlines": 5,
    "milterapp.transports": 5,
    "milterapp.logconfig": 5,
    "milterapp.loops": 5,
    "milterapp.loadgen": 5,
    "milterapp.loadscript": 5,
    "milterapp.loadresult": 5,
    "milterapp.workers": 5,
    "milterapp.testing": 5,  # every module under milterapp/testing/ too (see layer_of)
    "milterapp.cli": 6,
    "milterapp.demo": 6,
    "milterapp.wiredemo": 6,
    "milterapp.__main__": 6,
    # The package __init__ re-exports everything; its own imports are not checked, and only
    # top-layer modules may import from it (anything lower would be an import cycle).
    "milterapp": 6,
}

#: Upward imports allowed inside a function body only: ``App.run()`` and ``App.serve()`` are
#: conveniences that hand the app to the server (as Flask's ``run()`` defers to werkzeug).
DEFERRED_UPWARD_IMPORTS = frozenset({("milterapp.app", "milterapp.server")})

#: Default layer of a module under milterapp/protocol/ that is not listed in LAYERS.
PROTOCOL_LAYER = 2
#: Modules whose own imports are not restricted.
UNRESTRICTED = frozenset({"milterapp"})
#: Top-level packages the sans-IO core must never import, not even under TYPE_CHECKING.
PROTOCOL_FORBIDDEN_PACKAGES = frozenset({"asyncio", "socket", "selectors", "structlog"})
#: The sans-IO core may import milterapp modules below this layer only.
PROTOCOL_MAX_LAYER = 2

# --------------------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parent.parent
PACKAGE_DIR = ROOT / "milterapp"
PROTOCOL_PACKAGE = "milterapp.protocol"
TABLE_HINT = "add it to LAYERS at the top of tests/test_architecture.py"


@dataclass(frozen=True)
class Import:
    """One milterapp-relevant import found in a module."""

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


def _is_package(name: str) -> bool:
    return name in MODULES and MODULES[name].name == "__init__.py"


def layer_of(module: str) -> int | None:
    """Return the layer of a milterapp module, or None if the table does not know it."""
    if module in LAYERS:
        return LAYERS[module]
    if module.startswith(PROTOCOL_PACKAGE + "."):
        return PROTOCOL_LAYER
    if module.startswith("milterapp.testing."):
        return LAYERS["milterapp.testing"]
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
        is_submodule = candidate in MODULES or candidate in LAYERS
        targets.append(candidate if is_submodule else source)
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


# --------------------------------------------------------------------------------------------
# Layering
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("module", sorted(MODULES))
def test_architecture_module_has_a_layer(module: str) -> None:
    assert layer_of(module) is not None, f"{module} has no layer: {TABLE_HINT}"


@pytest.mark.parametrize("module", sorted(set(MODULES) - UNRESTRICTED))
def test_architecture_module_imports_only_lower_layers(module: str) -> None:
    own_layer = layer_of(module)
    assert own_layer is not None, f"{module} has no layer: {TABLE_HINT}"
    problems = []
    for imp in imports_of(module):
        if not _is_milterapp(imp.module) or imp.type_checking_only:
            continue
        if imp.in_function and (module, imp.module) in DEFERRED_UPWARD_IMPORTS:
            continue
        target_layer = layer_of(imp.module)
        if target_layer is None:
            problems.append(f"line {imp.line}: imports unknown module {imp.module}: {TABLE_HINT}")
        elif target_layer > own_layer:
            problems.append(
                f"line {imp.line}: imports {_describe(imp.module)}, a higher layer; move the "
                "shared code down, or import it under `if TYPE_CHECKING:` if only "
                "annotations need it"
            )
    assert not problems, f"{_describe(module)}:\n  " + "\n  ".join(problems)


@pytest.mark.parametrize("module", PROTOCOL_MODULES)
def test_architecture_protocol_module_stays_sans_io(module: str) -> None:
    problems = []
    for imp in imports_of(module):  # TYPE_CHECKING imports count here too
        top_level = imp.module.partition(".")[0]
        if top_level in PROTOCOL_FORBIDDEN_PACKAGES:
            problems.append(
                f"line {imp.line}: imports {imp.module}; the core does no I/O or logging"
            )
        elif _is_milterapp(imp.module):
            target_layer = layer_of(imp.module)
            if target_layer is None or target_layer > PROTOCOL_MAX_LAYER:
                problems.append(
                    f"line {imp.line}: imports {_describe(imp.module)}; the core may only "
                    f"import milterapp modules of layer {PROTOCOL_MAX_LAYER} or lower"
                )
    assert not problems, f"{module} must stay sans-IO:\n  " + "\n  ".join(problems)


def test_architecture_protocol_package_init_is_docstring_only() -> None:
    if not (PACKAGE_DIR / "protocol").is_dir():
        pytest.skip("milterapp/protocol/ does not exist yet")
    path = PACKAGE_DIR / "protocol" / "__init__.py"
    assert path.is_file(), "milterapp/protocol/__init__.py is missing"
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    assert ast.get_docstring(tree), "milterapp/protocol/__init__.py needs its docstring"
    # Anything else could import a sibling and cycle through milterapp.events.
    assert len(tree.body) == 1, "milterapp/protocol/__init__.py must contain only a docstring"


def test_architecture_import_collector_understands_relative_and_guarded_imports() -> None:
    source = (
        "from typing import TYPE_CHECKING\n"
        "from .. import errors\n"
        "from . import framing\n"
        "from .constants import Command\n"
        "from .. import events\n"
        "import milterapp.replies as r\n"
        "if TYPE_CHECKING:\n"
        "    from milterapp.app import App\n"
        "else:\n"
        "    from milterapp.spec import ConnectionSpec\n"
    )
    collector = _ImportCollector("milterapp.protocol.codec")
    collector.visit(ast.parse(source))
    found = {(imp.module, imp.type_checking_only) for imp in collector.imports}
    assert found == {
        ("typing", False),
        ("milterapp.errors", False),
        ("milterapp.protocol.framing", False),
        ("milterapp.protocol.constants", False),
        ("milterapp.events", False),
        ("milterapp.replies", False),
        ("milterapp.app", True),
        ("milterapp.spec", False),
    }


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def _public_api() -> list[str]:
    if not (PACKAGE_DIR / "__init__.py").is_file():
        pytest.fail("milterapp/__init__.py is missing")
    package = importlib.import_module("milterapp")
    names = getattr(package, "__all__", None)
    assert isinstance(names, list), "milterapp/__init__.py must define __all__ as a list"
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


def test_architecture_public_names_resolve() -> None:
    package = importlib.import_module("milterapp")
    missing = [name for name in _public_api() if not hasattr(package, name)]
    assert not missing, f"milterapp.__all__ names that do not resolve: {missing}"


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


def test_architecture_all_is_sorted() -> None:
    names = _public_api()
    expected = sorted(names, key=_ruff_sort_key)
    assert names == expected, (
        "milterapp.__all__ is not sorted (the order of ruff's RUF022: `ruff check --fix` "
        f"sorts it); expected {expected}"
    )
    duplicates = sorted({name for name in names if names.count(name) > 1})
    assert not duplicates, f"milterapp.__all__ lists names twice: {duplicates}"


def test_architecture_package_ships_py_typed() -> None:
    assert (PACKAGE_DIR / "py.typed").is_file(), "milterapp/py.typed is missing (PEP 561)"
