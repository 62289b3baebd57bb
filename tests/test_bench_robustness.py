"""The robustness matrix's bookkeeping (benchmarks/bench_robustness.py): attack rows with their
own strength, workers that share one results file, and the markdown matrix."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "bench_robustness", ROOT / "benchmarks" / "bench_robustness.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_attack_rows_take_their_own_strength_or_the_flags(bench: ModuleType) -> None:
    rows = bench.attack_rows("none,backdoor:4,backdoor, sign_flip:1", {"backdoor": 1.0})
    assert rows == [
        ("none", "none", 1.0),
        ("backdoor_x4", "backdoor", 4.0),
        ("backdoor", "backdoor", 1.0),
        ("sign_flip_x1", "sign_flip", 1.0),
    ]
    with pytest.raises(SystemExit, match="'noise:big'"):
        bench.attack_rows("noise:big", {})


def test_two_workers_recording_into_one_file_keep_each_others_runs(
    bench: ModuleType, tmp_path: Path
) -> None:
    path = tmp_path / "matrix_cpu.json"
    first = {"command": "same", "runs": {}}
    second = {"command": "same", "runs": {}}  # started before the first recorded anything
    bench.record_run(
        path, first, "fedavg_none", {"column": "fedavg", "attack": "none", "final": 2.0}
    )
    held = bench.record_run(
        path, second, "flock_none", {"column": "flock", "attack": "none", "final": 2.2}
    )
    assert set(held["runs"]) == {"fedavg_none", "flock_none"}
    assert set(json.loads(path.read_text())["runs"]) == {"fedavg_none", "flock_none"}
    # a different command's file is replaced, not merged
    entry = {"column": "x", "attack": "none", "final": 1.0}
    other = bench.record_run(path, {"command": "new", "runs": {}}, "x_none", entry)
    assert set(other["runs"]) == {"x_none"}


def test_a_run_is_taken_once_while_its_worker_lives(bench: ModuleType, tmp_path: Path) -> None:
    marker = tmp_path / "matrix_cpu.json.fedavg_none.running"
    assert bench.claim(marker)
    assert marker.read_text() == str(os.getpid())
    assert not bench.claim(marker)  # held by a live process (this one)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    marker.write_text(dead.stdout.strip())
    assert bench.claim(marker)  # its worker died: taken over
    assert marker.read_text() == str(os.getpid())


def test_matrix_table_cells(bench: ModuleType) -> None:
    runs = {
        "fedavg_none": {"column": "fedavg", "attack": "none", "row": "none", "final": 2.0},
        "fedavg_backdoor_x4": {
            "column": "fedavg", "attack": "backdoor", "row": "backdoor_x4", "final": 2.1,
            "backdoor": {"success_with_trigger": 1.0},
        },
        "flock_backdoor_x4": {
            "column": "flock", "attack": "backdoor", "row": "backdoor_x4", "final": 1.9,
            "backdoor": {"success_with_trigger": 0.25},
            "malicious_proposals_accepted": "1/3", "honest_proposals_accepted": "5/6",
            "honest_votes": {"on_honest": {"votes": 20, "rejected": 2}},
        },
        "multi_krum_none": {"column": "multi_krum", "attack": "none", "row": "none", "final": 2.0,
                            "aggregation": [{"attacker": [False] * 3, "kept": [True] * 3}]},
        "multi_krum_backdoor_x4": {
            "column": "multi_krum", "attack": "backdoor", "row": "backdoor_x4", "final": 2.0,
            "backdoor": {"success_with_trigger": 0.0},
            "aggregation": [
                {"attacker": [False, True, False], "kept": [True, False, True]},
                {"attacker": [True, False, True], "kept": [True, True, False]},
            ],
        },
    }  # fmt: skip
    table = bench.matrix_table({"runs": runs}).splitlines()
    assert table[0] == "| attack | fedavg | flock | multi_krum |"
    assert table[2] == "| none | +0.0% |  | +0.0% |"
    assert table[3] == (
        "| backdoor_x4 | +5.0%, bd 100% | -5.0%, bd 25%, mal 1/3, hon rej 1/6, fp 2/20 "
        "| +0.0%, bd 0%, mal kept 1/3 |"
    )
