"""The optional mypyc build (docs/performance.md, "Compiled build"): which modules it compiles,
and that a test run tests the build it says it does, from where it says it does."""

from __future__ import annotations

import importlib
import inspect
import os
import subprocess
import sys
import sysconfig
import tomllib
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path
from types import ModuleType

import pydantic
import pytest

import milterapp

ROOT = Path(__file__).resolve().parent.parent


def compiled_paths() -> list[str]:
    """The modules pyproject.toml has mypyc compile, as paths from the project root."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    hook = config["tool"]["hatch"]["build"]["targets"]["wheel"]["hooks"]["mypyc"]
    paths: list[str] = hook["include"]
    return paths


def is_extension(module: ModuleType) -> bool:
    return (module.__file__ or "").endswith(tuple(EXTENSION_SUFFIXES))


@pytest.mark.parametrize("path", compiled_paths())
def test_compiled_module_exists_and_defines_no_model(path: str) -> None:
    assert (ROOT / path).is_file()
    name = path.removesuffix(".py").replace("/", ".")
    module = importlib.import_module(name)
    # mypyc cannot compile a module that defines pydantic models (pyproject.toml says so).
    models = [
        value.__name__
        for value in vars(module).values()
        if inspect.isclass(value)
        and issubclass(value, pydantic.BaseModel)
        and value.__module__ == name
    ]
    assert models == []


def test_every_listed_module_is_built_the_same_way() -> None:
    built = {
        path: is_extension(importlib.import_module(path.removesuffix(".py").replace("/", ".")))
        for path in compiled_paths()
    }
    # All or none: a half-compiled package is a broken build, not a faster one.
    assert set(built.values()) == {milterapp.COMPILED}, built
    # CI runs the suite once pure and once compiled, and says which it expects.
    expected = os.environ.get("MILTERAPP_EXPECT_COMPILED")
    if expected is not None:
        assert milterapp.COMPILED is (expected == "1")


def test_the_pythons_the_tests_start_import_this_milterapp() -> None:
    """A Python started in the tree's root, as many tests start one, imports the package that
    these tests import; CI's run against an installed wheel says so, and that it is the wheel."""
    here = Path(milterapp.__file__ or "").resolve()
    child = subprocess.run(
        [sys.executable, "-c", "import milterapp; print(milterapp.__file__)"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert Path(child.stdout.strip()).resolve() == here
    # .ci/run tests the wheel it built from a copy of the tree, which PYTHONSAFEPATH=1 and a .pth
    # file put last on sys.path; cibuildwheel from a directory without milterapp/. Either way,
    # here and in the Pythons the tests start, milterapp must be the installed wheel's.
    if os.environ.get("MILTERAPP_EXPECT_WHEEL") == "1":
        site_packages = Path(sysconfig.get_path("platlib")).resolve()
        assert here.is_relative_to(site_packages), f"{here} is not in {site_packages}"
        assert not here.is_relative_to(ROOT), f"{here} is the tree's, not the wheel's"
