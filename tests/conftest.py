"""Shared test configuration for milterapp.

Hypothesis profiles: ``dev`` (the default) and ``ci`` (more examples, chosen automatically when
the ``CI`` environment variable is set). Pick one explicitly with ``HYPOTHESIS_PROFILE``.
Neither profile has a deadline: timing belongs in bench/, not in tests.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import structlog
from hypothesis import settings

settings.register_profile("ci", deadline=None, max_examples=200)
settings.register_profile("dev", deadline=None, max_examples=100)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


@pytest.fixture(autouse=True)
def _structlog_defaults() -> Iterator[None]:
    """Undo logging set-up done by a test (the command line configures structlog)."""
    yield
    structlog.reset_defaults()
