"""The serve tests' loaded session on the tiny finished run (`tiny_run`, in tests/conftest.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from covey.serve.generate import ServeSession


@pytest.fixture(scope="session")
def session(tiny_run: Path) -> ServeSession:
    """The run's final adapter on its base, loaded once (tests must not change it)."""
    from covey.serve.adapters import resolve_source
    from covey.serve.generate import load_session

    return load_session(resolve_source(run=tiny_run))


@pytest.fixture
def run_copy(tiny_run: Path, tmp_path: Path) -> Path:
    """A private copy of the run, for tests that damage or edit it."""
    return Path(shutil.copytree(tiny_run, tmp_path / "run"))
