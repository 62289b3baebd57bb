"""`covey data split` end to end: the files it writes, duplicates, atomic writes, the CLI."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from covey.data import split as split_module
from covey.data.split import SplitConfig, run_split
from covey.errors import ConfigError, CoveyError
from tests.conftest import dolly_records, write_records


def test_writes_clients_test_manifest_and_figure(
    dolly_file: Callable[..., Path], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    manifest = run_split(SplitConfig(input=str(dolly_file(per_category=30)), out=out, clients=3))

    names = sorted(p.name for p in out.iterdir())
    assert names == [
        *(f"client_{i}.jsonl" for i in range(3)),
        "distribution.png",
        "manifest.json",
        "test.jsonl",
    ]
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert (out / "distribution.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for name, digest in manifest["files_sha256"].items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest
    rows = [json.loads(line) for line in (out / "client_0.jsonl").read_text().splitlines()]
    assert len(rows) == manifest["clients"][0]["count"]
    assert set(rows[0]) == {"instruction", "context", "response", "category", "id"}
    assert manifest["source"]["records"] == 240 and manifest["source"]["format"] == "dolly"
    assert sum(c["count"] for c in manifest["clients"]) + manifest["test"]["count"] == 240
    assert manifest["settings"]["scheme"] == "dirichlet" and manifest["seed"] == 42


def test_duplicates_are_counted_and_dropped_with_dedup(tmp_path: Path) -> None:
    records = dolly_records(per_category=20)
    records += [
        dict(records[3]),
        dict(records[5], category=records[6]["category"]),
        dict(records[3]),
    ]
    source = write_records(tmp_path / "d.jsonl", records)
    settings = {"input": str(source), "clients": 2, "min_size": 5}

    kept = run_split(SplitConfig(out=tmp_path / "kept", **settings))
    assert kept["duplicates"]["count"] == 3 and not kept["duplicates"]["dropped"]
    assert {"id": 160, "same_as": 3} in kept["duplicates"]["examples"]
    assert kept["train_records"] + kept["test"]["count"] == 163

    dropped = run_split(SplitConfig(out=tmp_path / "dropped", dedup=True, **settings))
    assert dropped["duplicates"]["count"] == 3 and dropped["duplicates"]["dropped"]
    assert dropped["train_records"] + dropped["test"]["count"] == 160
    written = [
        json.loads(line)["id"]
        for f in (tmp_path / "dropped").glob("*.jsonl")
        for line in f.read_text().splitlines()
    ]
    assert not {160, 161, 162} & set(written) and len(written) == 160


def test_non_empty_output_is_refused_without_overwrite(
    dolly_file: Callable[..., Path], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    cfg = SplitConfig(input=str(dolly_file()), out=out, clients=2, min_size=5)
    with pytest.raises(CoveyError, match="not empty; pass --overwrite"):
        run_split(cfg)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]

    cfg.overwrite = True
    run_split(cfg)
    assert not (out / "keep.txt").exists() and (out / "manifest.json").exists()


def test_a_failed_write_leaves_no_folder_and_the_previous_one_intact(
    dolly_file: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = str(dolly_file())

    def fail(*_: object) -> None:
        raise OSError("disk full")

    import covey.data.plot

    monkeypatch.setattr(covey.data.plot, "plot_distribution", fail)  # fails after the .jsonl files
    with pytest.raises(OSError, match="disk full"):
        run_split(SplitConfig(input=source, out=tmp_path / "new", clients=2, min_size=5))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.jsonl"]  # no folder, no temp

    monkeypatch.undo()
    previous = run_split(SplitConfig(input=source, out=tmp_path / "old", clients=2, min_size=5))
    before = {p.name: p.read_bytes() for p in (tmp_path / "old").iterdir()}
    monkeypatch.setattr(covey.data.plot, "plot_distribution", fail)
    with pytest.raises(OSError):
        run_split(
            SplitConfig(input=source, out=tmp_path / "old", clients=3, min_size=5, overwrite=True)
        )
    assert {p.name: p.read_bytes() for p in (tmp_path / "old").iterdir()} == before
    assert len(previous["clients"]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.jsonl", "old"]


def test_bundled_sample_is_the_default_input(tmp_path: Path) -> None:
    manifest = run_split(SplitConfig(out=tmp_path / "out"))
    assert manifest["source"]["records"] == 400
    assert manifest["test"]["by_category"] == dict.fromkeys(manifest["categories"], 10)
    assert len(manifest["categories"]) == 8 and len(manifest["clients"]) == 4
    assert split_module.bundled_sample_path().is_file()


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "covey", *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )


def test_cli_prints_the_table_and_writes_the_folder(tmp_path: Path) -> None:
    result = run_cli(
        "data", "split", "--clients", "3", "--scheme", "iid", "--out", "split", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert "iid split (seed 42)" in result.stdout and "summarization" in result.stdout
    assert "320 training records for 3 clients, 80 held out" in result.stdout
    assert (tmp_path / "split" / "client_2.jsonl").exists()


def test_cli_errors_are_one_clear_line_and_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "response": 7}\n')
    result = run_cli("data", "split", "--input", str(bad), "--out", "o", cwd=tmp_path)
    assert result.returncode == 2
    assert (
        "error:" in result.stderr and "line 1" in result.stderr and "Traceback" not in result.stderr
    )
    result = run_cli("data", "split", "--scheme", "nope", cwd=tmp_path)
    assert result.returncode == 2 and "nope" in result.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"seed": -1}, r"--seed -1: expected 0 \.\. 4294967295"),
        ({"seed": 2**32}, r"--seed 4294967296: expected 0 \.\. 4294967295"),
        ({"test_per_category": 0}, r"--test-per-category 0 holds out no test records"),
        ({"test_fraction": 0.001}, r"the test set is empty.*--test-fraction 0\.001"),
    ],
)
def test_settings_that_cannot_work_are_refused_before_writing(
    dolly_file: Callable[..., Path], tmp_path: Path, settings: dict[str, object], message: str
) -> None:
    cfg = SplitConfig(input=str(dolly_file()), out=tmp_path / "out", clients=2, min_size=5)
    with pytest.raises(ConfigError, match=message):
        run_split(replace(cfg, **settings))  # type: ignore[arg-type]
    assert not (tmp_path / "out").exists()


def test_a_negative_seed_is_one_clear_line_not_a_traceback(tmp_path: Path) -> None:
    result = run_cli("data", "split", "--seed", "-1", "--out", "o", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "--seed -1" in result.stderr and "Traceback" not in result.stderr


def test_help_outside_a_terminal_is_plain_and_whole(tmp_path: Path) -> None:
    """Piped into a log, --help kept 80 columns and cut long option names with an ellipsis."""
    result = run_cli("data", "split", "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for option in ("--test-per-category", "--categories-per-client", "--quantity-skew"):
        assert option in result.stdout
    assert "…" not in result.stdout and "\x1b[" not in result.stdout
