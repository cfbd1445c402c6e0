"""Shared test configuration for milterapp.

Hypothesis profiles: ``dev`` (the default) and ``ci`` (more examples, chosen automatically when
the ``CI`` environment variable is set). Pick one explicitly with ``HYPOTHESIS_PROFILE``.
Neither profile has a deadline: timing belongs in bench/, not in tests.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
from hypothesis import settings

ROOT = Path(__file__).resolve().parent.parent


def pytest_sessionstart(session: pytest.Session) -> None:
    """Refuse to test compiled modules older than their source: Python would import the stale
    compiled module and the edit would go untested (an editable mypyc build)."""
    stale = [
        str(built.relative_to(ROOT))
        for built in sorted((ROOT / "milterapp").rglob("*.so"))
        if (source := built.with_name(built.name.split(".")[0] + ".py")).exists()
        and source.stat().st_mtime > built.stat().st_mtime
    ]
    if stale:
        pytest.exit(
            f"compiled modules older than their source: {', '.join(stale)}. Rebuild them "
            "(HATCH_BUILD_HOOK_ENABLE_MYPYC=1 pip install -e .) or remove them "
            "(find milterapp -name '*.so' -delete) for the pure-Python build.",
            returncode=4,
        )


settings.register_profile("ci", deadline=None, max_examples=200)
settings.register_profile("dev", deadline=None, max_examples=100)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


@pytest.fixture(autouse=True)
def _structlog_defaults() -> Iterator[None]:
    """Undo logging set-up done by a test (the command line configures structlog)."""
    yield
    structlog.reset_defaults()


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A fresh short directory for unix sockets (sun_path holds 107 bytes; tmp_path may not)."""
    path = Path(tempfile.mkdtemp(prefix="mt-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)
