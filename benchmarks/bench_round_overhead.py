"""Where a round's time goes on the CPU demo: training steps, evaluation, and the engine itself.

Runs examples/cpu-demo.toml in process (into a temporary folder) with progress hooks that time
each round from its start to the end of its checkpoint. The engine's overhead is what is left
after the clients' step loops (`train`) and the held-out evaluation (`eval`): selection,
adapter swaps, validation, aggregation, checkpoint writing, metrics and plot.
Writes benchmarks/results/round_overhead.json.

    .venv/bin/python benchmarks/bench_round_overhead.py [--recipe examples/cpu-demo.toml]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from covey.config import load_recipe
from covey.fed import engine
from covey.fed.rounds import Hooks
from covey.fed.runfolder import RoundRecord
from covey.model.loading import base_model_id, load_base_model

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--recipe", default=str(ROOT / "examples" / "cpu-demo.toml"))
    parser.add_argument("--data", default=str(ROOT / "runs" / "demo" / "data"))
    parser.add_argument("--set", action="append", default=[], help="recipe override")
    args = parser.parse_args()
    out = Path(tempfile.mkdtemp()) / "run"
    cfg = load_recipe(args.recipe, [f"run.out='{out}'", f"data.dir='{args.data}'", *args.set])

    t0 = time.perf_counter()
    model, tokenizer = load_base_model(cfg.model)
    fed = engine.prepare(cfg, model, tokenizer, base_model_id(cfg.model))
    prepare_s = time.perf_counter() - t0
    starts: dict[int, float] = {}
    rounds = []

    def round_start(index: int, total: int, selected: list[int]) -> None:
        starts[index] = time.perf_counter()

    def round_end(record: RoundRecord) -> None:
        wall = time.perf_counter() - starts[record.round]
        train, evaluation = record.seconds["train"], record.seconds["eval"]
        overhead = wall - train - evaluation
        rounds.append(
            {
                "round": record.round,
                "wall_s": wall,
                "train_s": train,
                "eval_s": evaluation,
                "overhead_s": overhead,
                "overhead_share": overhead / wall,
            }
        )
        print(rounds[-1], flush=True)

    hooks = Hooks(round_start=round_start, round_end=round_end)
    t1 = time.perf_counter()
    engine.run_federated(cfg, fed, hooks=hooks)
    total = time.perf_counter() - t1
    result = {
        "command": "python benchmarks/bench_round_overhead.py",
        "recipe": str(Path(args.recipe).relative_to(ROOT)),
        "overrides": args.set,
        "machine": f"{os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}",
        "load_and_prepare_s": prepare_s,
        "run_s": total,
        "rounds": rounds,
        "overhead_share_max": max(r["overhead_share"] for r in rounds),
    }
    path = ROOT / "benchmarks" / "results" / "round_overhead.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
