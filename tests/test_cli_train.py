"""End to end through the real CLI, as a user runs it: split, train, and the files written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import dolly_records, write_records


def covey(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "covey", *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def test_split_then_train_writes_a_complete_run(tiny_model_dir: Path, tmp_path: Path) -> None:
    write_records(tmp_path / "dolly.jsonl", dolly_records(per_category=8))
    split = covey(
        "data", "split", "--input", "dolly.jsonl", "--clients", "2", "--min-size", "5",
        "--test-per-category", "1", "--out", "data", cwd=tmp_path,
    )  # fmt: skip
    assert split.returncode == 0, split.stderr
    recipe = tmp_path / "tiny.toml"
    recipe.write_text(
        f'[model]\nbase = "{tiny_model_dir}"\n'
        '[lora]\nr = 4\n[prompt]\ntemplate = "chat"\ncutoff_len = 128\n'
        "[train]\nbatch_size = 8\nmicro_batch_size = 4\nlr = 0.03\n"
        "[fed]\nrounds = 2\n[eval]\nsample_instructions = 1\nmax_new_tokens = 4\n"
        '[data]\ndir = "data"\n[run]\nout = "run"\n'
    )
    train = covey("train", str(recipe), "--set", "train.epochs=2", cwd=tmp_path)
    assert train.returncode == 0, train.stderr
    assert "federated rounds" in train.stdout and "held-out instructions" in train.stdout
    assert "round 2: held-out loss" in train.stdout

    run = tmp_path / "run"
    for name in ("config.toml", "metrics.jsonl", "loss.png", "final/adapter_model.safetensors"):
        assert (run / name).is_file(), name
    assert (run / "loss.png").read_bytes()[:4] == b"\x89PNG"
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in metrics] == [0, 1, 2]
    assert metrics[-1]["eval"]["loss"] < metrics[0]["eval"]["loss"]
    assert "epochs = 2.0" in (run / "config.toml").read_text()  # the --set value is recorded
    config = json.loads((run / "final" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["peft_type"] == "LORA"

    again = covey("train", str(recipe), cwd=tmp_path)
    assert again.returncode == 2 and "pass --resume" in again.stderr

    # A misspelt value, or a resume with other settings, is refused before anything is loaded or
    # deleted, even with --overwrite: the finished run stays as it was.
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    refusals = {
        ("--consensus", "flok", "--overwrite"): [
            "fed.consensus = 'flok' is not one of: server, flock (did you mean 'flock'?)"
        ],
        ("--set", "train.lr_schedule=cosin", "--overwrite"): [
            "--set train.lr_schedule=cosin: train.lr_schedule = 'cosin'",
            "constant, linear, cosine",
        ],
        ("--set", "train.lrr=1", "--overwrite"): [
            "--set train.lrr=1: unknown setting train.lrr (did you mean 'lr'?)"
        ],
        ("--set", "train.lr=0.5", "--resume"): [
            "train.lr: 0.03 -> 0.5",
            "train.epochs: 2.0 -> 1.0",
        ],
        ("--set", "fed.strategy=fedadam", "--consensus", "flock", "--overwrite"): [
            "fed.strategy = 'fedadam' cannot combine with fed.consensus = 'flock'"
        ],
    }
    for flags, messages in refusals.items():
        refused = covey("train", str(recipe), *flags, cwd=tmp_path)
        assert refused.returncode == 2, (flags, refused.stderr)
        for message in messages:
            assert message in " ".join(refused.stderr.split()), (flags, refused.stderr)
    after = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert after == before
