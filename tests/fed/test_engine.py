"""The embedded engine on a tiny Llama: learning, outputs, PEFT loading, resume, strategies."""

from __future__ import annotations

import itertools
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from covey.config import RunConfig, load_recipe
from covey.data.records import Record, spread
from covey.errors import ConfigError
from covey.fed import engine
from covey.fed.rounds import Played, RunFolder, RunHistory, run_rounds
from covey.fed.runfolder import client_line, content_hash
from covey.fed.strategies import Accumulator
from covey.model.loading import base_model_id, load_base_model
from covey.state import State


def tiny_config(tiny_model_dir: Path, client_data_dir: Path, out: Path, *sets: str) -> RunConfig:
    """A recipe sized for milliseconds per step: the tiny model, 3 clients, 3 rounds."""
    return load_recipe(
        None,
        [
            f"model.base='{tiny_model_dir}'",
            f"data.dir='{client_data_dir}'",
            f"run.out='{out}'",
            "lora.r=4",
            "lora.alpha=8",
            "lora.dropout=0.0",
            "prompt.template=chat",
            "prompt.cutoff_len=128",
            "train.epochs=2",
            "train.batch_size=8",
            "train.micro_batch_size=8",
            "train.lr=3e-2",
            "fed.rounds=3",
            "eval.sample_instructions=2",
            "eval.max_new_tokens=8",
            *sets,
        ],
    )


def run(cfg: RunConfig, resume: bool = False) -> RunHistory:
    model, tokenizer = load_base_model(cfg.model)
    fed = engine.prepare(cfg, model, tokenizer, base_model_id(cfg.model))
    return engine.run_federated(cfg, fed, resume=resume)


@pytest.fixture(scope="module")
def fedavg_run(tiny_model_dir: Path, client_data_dir: Path, tmp_path_factory: Any) -> RunHistory:
    out = tmp_path_factory.mktemp("run") / "fedavg"
    return run(tiny_config(tiny_model_dir, client_data_dir, out))


def test_held_out_subsets_are_spread_over_the_categories() -> None:
    """The test set is grouped by category: `eval.max_examples` and `eval.rouge_examples` take
    records at even steps, not the first ones (24 of 80 used to be 2.4 categories of 8)."""
    records = [
        Record(instruction=f"q{i}", context="", response="r", category=f"c{i // 10}", id=i)
        for i in range(80)
    ]
    picked = spread(records, 24)
    assert len(picked) == 24 and {r.category for r in picked} == {f"c{k}" for k in range(8)}
    assert [r.id for r in picked] == sorted({r.id for r in picked})  # in order, no repeats
    assert spread(records, 200) == records and spread(records, 0) == []


def test_held_out_loss_falls_every_round(fedavg_run: RunHistory) -> None:
    losses = [r["eval"]["loss"] for r in fedavg_run.records]
    assert [r["round"] for r in fedavg_run.records] == [0, 1, 2, 3]
    assert all(b < a for a, b in itertools.pairwise(losses)), losses
    assert losses[-1] < losses[0] - 0.1


def test_run_folder_holds_rounds_metrics_plot_and_final(fedavg_run: RunHistory) -> None:
    out = fedavg_run.out
    assert {p.name for p in out.iterdir()} == {
        "config.toml", "metrics.jsonl", "loss.png", "final",
        "round_000", "round_001", "round_002", "round_003",
    }  # fmt: skip
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["round"] for line in lines] == [0, 1, 2, 3]
    record = json.loads((out / "round_002" / "round.json").read_text())
    assert record["selected"] == [0, 1, 2] and len(record["clients"]) == 3
    assert all(c["num_samples"] > 0 for c in record["clients"]) and record["rejected"] == []
    weights = (out / "round_002" / "adapter_model.safetensors").read_bytes()
    assert record["adapter_sha256"] == content_hash(weights)
    assert (out / "round_002" / "config.toml").read_text() == (out / "config.toml").read_text()
    assert len(record["answers"]) == 2 and "answer" in record["answers"][0]
    final = out / "final" / "adapter_model.safetensors"
    assert final.read_bytes() == (out / "round_003" / "adapter_model.safetensors").read_bytes()


def test_saved_adapter_loads_with_peft(
    fedavg_run: RunHistory, tiny_model_dir: Path, client_data_dir: Path
) -> None:
    """A plain transformers + PEFT user gets the same model the engine evaluated: the final
    folder, loaded without Covey, scores the engine's recorded held-out loss of the last round
    (computed here by plain cross-entropy, one example at a time, no packing)."""
    from transformers import AutoTokenizer

    from covey.data.prompts import IGNORE_INDEX, tokenize_records
    from covey.data.records import load_records

    cfg = tiny_config(tiny_model_dir, client_data_dir, fedavg_run.out)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    test = load_records(client_data_dir / "test.jsonl").records
    examples = tokenize_records(test, tokenizer, cfg.prompt, mask_prompt=True)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, fedavg_run.out / "final").eval()
    total, tokens = 0.0, 0
    with torch.no_grad():
        for example in examples:
            logits = model(input_ids=torch.tensor([example.input_ids])).logits[0, :-1]
            labels = torch.tensor(example.labels[1:])
            total += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
            tokens += int((labels != IGNORE_INDEX).sum())
        recorded = fedavg_run.records[-1]["eval"]
        assert recorded["examples"] == len(examples) and recorded["tokens"] == tokens
        assert total / tokens == pytest.approx(recorded["loss"], rel=1e-5, abs=0)
        ids = torch.tensor([examples[0].input_ids])
        with model.disable_adapter():
            plain = model(input_ids=ids).logits
        assert not torch.allclose(plain, model(input_ids=ids).logits)  # the adapter does act
    state = load_file(fedavg_run.out / "final" / "adapter_model.safetensors")
    loaded = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert len(loaded) == len(state)


@pytest.mark.parametrize("strategy", ["fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad"])
def test_every_strategy_runs_and_learns(
    strategy: str, tiny_model_dir: Path, client_data_dir: Path, tmp_path: Path
) -> None:
    sets = [f"fed.strategy={strategy}", "fed.rounds=2"]
    if strategy == "fedprox":
        sets.append("train.prox_mu=0.01")
    if strategy in ("fedadam", "fedyogi", "fedadagrad"):
        sets += ["fed.server_lr=0.01", "fed.tau=0.001"]
    result = run(tiny_config(tiny_model_dir, client_data_dir, tmp_path / strategy, *sets))
    losses = [r["eval"]["loss"] for r in result.records]
    assert losses[-1] < losses[0], losses
    if strategy != "fedprox":
        assert (tmp_path / strategy / "round_002" / "server_state.safetensors").exists()


def test_updates_beyond_the_norm_bound_are_rejected_and_the_round_completes(
    tiny_model_dir: Path, client_data_dir: Path, tmp_path: Path
) -> None:
    cfg = tiny_config(tiny_model_dir, client_data_dir, tmp_path / "r", "fed.rounds=1")
    cfg.fed.max_update_norm = 1e-6
    result = run(cfg)
    record = result.records[-1]
    assert record["clients"] == [] and len(record["rejected"]) == 3
    assert "norm" in record["rejected"][0]["reason"]
    before = load_file(tmp_path / "r" / "round_000" / "adapter_model.safetensors")
    after = load_file(tmp_path / "r" / "round_001" / "adapter_model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_an_engine_that_hands_over_the_next_adapter_skips_the_strategy(
    tiny_model_dir: Path, client_data_dir: Path, tmp_path: Path
) -> None:
    """FLock derives the next global adapter from the chain: the loop must save that adapter,
    leave the strategy's accumulator and server state alone, and record the engine's lines."""
    cfg = tiny_config(
        tiny_model_dir, client_data_dir, tmp_path / "r", "fed.rounds=1", "fed.strategy=fedadam"
    )
    model, tokenizer = load_base_model(cfg.model)
    fed = engine.prepare(cfg, model, tokenizer, base_model_id(cfg.model))
    handed: dict[str, torch.Tensor] = {}
    line = client_line(0, 5, False, {})

    def play(round_index: int, global_state: State, merge: Accumulator) -> Played:
        handed.update({k: v + 0.5 for k, v in global_state.items()})
        return Played(selected=[0], merge=merge, merged=[line], next_state=handed)

    folder = RunFolder.check(cfg, resume=False)
    record = run_rounds(cfg, folder, fed.run_model, play).records[-1]
    saved = load_file(tmp_path / "r" / "round_001" / "adapter_model.safetensors")
    assert saved.keys() == handed.keys()
    assert all(torch.equal(saved[k], handed[k]) for k in saved)
    assert record["clients"] == [line]
    assert not (tmp_path / "r" / "round_001" / "server_state.safetensors").exists()


def test_existing_run_needs_resume_and_the_same_settings(
    fedavg_run: RunHistory, tiny_model_dir: Path, client_data_dir: Path
) -> None:
    cfg = tiny_config(tiny_model_dir, client_data_dir, fedavg_run.out)
    with pytest.raises(ConfigError, match="pass --resume"):
        run(cfg)
    cfg.train.lr = 1e-3
    with pytest.raises(ConfigError, match="made with other settings"):
        run(cfg, resume=True)


@pytest.mark.slow  # two CLI processes, about 20 s
def test_resume_after_a_kill_mid_round_gives_the_same_final_adapter(
    tiny_model_dir: Path, client_data_dir: Path, tmp_path: Path, fedavg_run: RunHistory
) -> None:
    """Kill the real CLI during round 2 (SIGKILL: no cleanup), resume, compare with a clean run."""
    out = tmp_path / "killed"
    cfg = tiny_config(tiny_model_dir, client_data_dir, out)
    recipe = tmp_path / "recipe.toml"
    from covey.config import to_toml

    recipe.write_text(to_toml(cfg))
    command = [sys.executable, "-m", "covey", "train", str(recipe), "--quiet"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (out / "round_001" / "round.json").exists():
        assert process.poll() is None, process.stderr.read().decode() if process.stderr else ""
        assert time.monotonic() < deadline, "round 1 never finished"
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (out / "final").exists(), "the run finished before it was killed"

    resumed = subprocess.run([*command, "--resume"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    finished = load_file(out / "final" / "adapter_model.safetensors")
    uninterrupted = load_file(fedavg_run.out / "final" / "adapter_model.safetensors")
    assert set(finished) == set(uninterrupted)
    assert all(torch.equal(finished[k], uninterrupted[k]) for k in finished)
    assert not list(out.glob(".*tmp*")), "a staging folder was left behind"
