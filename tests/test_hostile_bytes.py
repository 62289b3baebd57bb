"""Every byte from a peer is parsed under hard limits: no proposal blob or task bundle can
crash the process that reads it (issue #26).

A participant imports web3, whose py_ecc raises the recursion limit to 100,000; a blob whose
header nested 100,000 `[` then overflowed the C stack in json.loads and killed every voter
with SIGSEGV (exit -11), on every restart. `tests/hostile_bytes.py` runs the corpus of
hostile blobs and bundles and hypothesis over generated ones through the real read paths in a
separate process set up like a participant; this test checks that process lives and that
everything hostile was refused with DataError.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import covey

ROOT = Path(__file__).resolve().parents[1]


def run_worker(*args: str) -> subprocess.CompletedProcess[str]:
    """`python -m tests.hostile_bytes ARGS` against this tree's covey."""
    src = Path(covey.__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(src), str(ROOT)])}
    return subprocess.run(
        [sys.executable, "-m", "tests.hostile_bytes", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip


def check(done: subprocess.CompletedProcess[str]) -> None:
    tail = "\n".join((done.stdout + done.stderr).splitlines()[-25:])
    assert done.returncode == 0, f"the reader died or failed (exit {done.returncode}):\n{tail}"
    assert "recursion limit after importing web3: 100000" in done.stdout  # set up as a peer
    assert done.stdout.rstrip().endswith("ALL REFUSED"), tail


def test_hostile_blobs_and_bundles_are_refused_and_the_reader_lives() -> None:
    check(run_worker("40"))


@pytest.mark.slow
def test_hostile_blobs_and_bundles_fuzzed_longer() -> None:
    check(run_worker("1500", "--random"))
