"""What an honest FLock voter's checks see on real updates: copy cosines and the norm bound.

Trains honest updates the way FLock proposers do (`covey.train.local.train_local` from the
round's global adapter on each participant's training split) and measures:

- cosines between the deltas (update minus the global adapter it was trained from) of
  (i) two participants in the same round, (ii) one participant training again from the same
  global adapter with another seed (a round that accepted nothing), (iii) one participant's
  delta of the next round (from the merged adapter) against another's earlier one: what
  `covey.flock.copies` compares, and (iv) the same participant across rounds; each in parameter
  space (the LoRA matrices) and in function space (B A, what the adapter adds to each weight),
  exact and as the voter's sketch sees them;
- the same for copies: the earlier delta re-wrapped (exact), applied to the new global adapter,
  perturbed with Gaussian noise of 0.1 to 2 times its norm, re-parametrized (B M, M^-1 A: the
  same function, other matrices) and averaged with another delta; with the loss change each
  brings on held-out examples (what the copier is paid for);
- each honest update's norm over `covey.fed.validation.training_norm_bound` (FLock's default
  bound), and that of the noise x100 attack and of an update of 1e30s, with validation's reason.

Writes benchmarks/results/voter_checks_<name>.json.

    nice .venv/bin/python benchmarks/bench_voter_checks.py --name smollm2_iid     # ~10 min
    nice .venv/bin/python benchmarks/bench_voter_checks.py --name smollm2_iid_8steps --steps 8 \
        --clients 3
    nice .venv/bin/python benchmarks/bench_voter_checks.py --tiny --name tiny --steps 4 \
        --clients 5                                                      # the tests' model, 4 s
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
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from covey.config import RunConfig, load_recipe
from covey.data.split import SplitConfig, run_split
from covey.fed import engine
from covey.fed.attacks import attack_update
from covey.fed.validation import training_norm_bound, validate_update
from covey.flock.agent import data_split
from covey.flock.copies import Sketcher, cosine, function_space, similarity
from covey.flock.scoring import flat_delta
from covey.model.loading import base_model_id, load_base_model
from covey.state import State
from covey.train.evaluate import example_losses
from covey.train.local import train_local

ROOT = Path(__file__).resolve().parents[1]
DOLLY = ROOT.parent / "shared" / "data" / "dolly"
sys.path.insert(0, str(ROOT))


def recipe(args: argparse.Namespace, data: Path, out: Path) -> RunConfig:
    sets = [f"data.dir='{data}'", f"run.out='{out}'", f"train.max_steps={args.steps}"]
    if args.tiny:  # tests/flock/test_protocol.py's recipe
        from tests.model.tiny import make_tiny_model_dir

        model = make_tiny_model_dir(out / "tiny")
        sets = [
            f"model.base='{model}'", "lora.r=4", "lora.alpha=8", "lora.dropout=0.0",
            "prompt.template=chat", "prompt.cutoff_len=128", "train.epochs=2",
            "train.batch_size=8", "train.micro_batch_size=8", "train.lr=3e-2",
            "fed.consensus=flock", "flock.validation_examples=4", *sets,
        ]  # fmt: skip
        return load_recipe(None, sets)
    return load_recipe(ROOT / "examples" / "flock-demo.toml", ["model.device='cpu'", *sets])


def split(args: argparse.Namespace, tmp: Path) -> Path:
    data = tmp / "data"
    if args.tiny:  # the fixture records tests/flock/test_protocol.py splits
        from tests.conftest import dolly_records, write_records

        source = write_records(tmp / "source.jsonl", dolly_records(per_category=12))
        run_split(SplitConfig(input=str(source), out=data, clients=args.clients, min_size=8,
                              scheme="iid", test_per_category=2))  # fmt: skip
        return data
    source = tmp / "train.jsonl"
    with open(args.train) as full:
        source.write_text("".join(itertools.islice(full, args.records)))
    scheme = ["--scheme", "iid"] if args.scheme == "iid" else ["--scheme", "dirichlet", "--alpha",
                                                                 "0.5"]  # fmt: skip
    subprocess.run(
        [sys.executable, "-m", "covey", "data", "split", "--input", str(source),
         "--test-from", args.test, "--clients", str(args.clients), *scheme,
         "--seed", str(args.seed), "--out", str(data)],
        check=True, capture_output=True,
    )  # fmt: skip
    return data


def command_line(args: argparse.Namespace) -> str:
    """The arguments as flags again (a flag that is off or unset is left out)."""
    flags = []
    for key, value in vars(args).items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            flags.append(flag)
        elif value not in (False, None):
            flags.append(f"{flag} {value}")
    return " ".join(flags)


def pairs(values: dict[tuple[Any, ...], float]) -> dict[str, float]:
    v = list(values.values())
    return {"n": len(v), "min": min(v), "max": max(v), "mean": sum(v) / len(v)} if v else {}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny", action="store_true", help="the tests' random tiny Llama")
    parser.add_argument("--name", default="smollm2")
    parser.add_argument("--train", default=str(DOLLY / "dolly-train-11k.jsonl"))
    parser.add_argument("--test", default=str(DOLLY / "dolly-test-80.jsonl"))
    parser.add_argument("--records", type=int, default=1200)
    parser.add_argument("--scheme", default="iid", choices=["iid", "dirichlet"])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--states", help="analyse the updates an earlier run saved")
    args = parser.parse_args()
    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp())
    cfg = recipe(args, split(args, tmp), tmp / "run")
    model, tokenizer = load_base_model(cfg.model)
    fed = engine.prepare(cfg, model, tokenizer, base_model_id(cfg.model))
    run_model = fed.run_model
    parts = [data_split(c.examples, cfg.flock.validation_examples) for c in fed.clients]
    held_out = [e for _, validation in parts for e in validation]

    def train(i: int, start: State, seed: int) -> State:
        state = train_local(run_model.model, parts[i][0], start, cfg.train, seed, run_model.pad_id)
        return state.state

    from covey.model.lora import adapter_state, load_adapter_state

    g0 = adapter_state(run_model.model)
    clients = range(len(fed.clients))
    if args.states:  # the updates of an earlier run (same arguments): analysis only
        saved = load_file(args.states)

        def part(tag: str) -> State:
            return {k.partition("/")[2]: v for k, v in saved.items() if k.startswith(tag + "/")}

        g0, g1 = part("g0"), part("g1")
        first, again, second = (
            {i: part(f"{tag}{i}") for i in clients} for tag in ("first", "again", "second")
        )
    else:
        first = {i: train(i, g0, 1000 + i) for i in clients}  # round 0
        again = {i: train(i, g0, 2000 + i) for i in clients}  # round 0 again (nothing accepted)
        g1 = {k: g0[k] + sum(first[i][k] - g0[k] for i in clients) / len(clients) for k in g0}
        second = {i: train(i, g1, 3000 + i) for i in clients}  # round 1, from the merged one
        saved = {f"g0/{k}": v for k, v in g0.items()} | {f"g1/{k}": v for k, v in g1.items()}
        for tag, states in (("first", first), ("again", again), ("second", second)):
            saved |= {f"{tag}{i}/{k}": v for i, s in states.items() for k, v in s.items()}
        save_file({k: v.contiguous() for k, v in saved.items()}, tmp / "states.safetensors")
        print(f"updates saved for --states: {tmp / 'states.safetensors'}", flush=True)
    trained_s = time.perf_counter() - started

    def delta(state: State, start: State) -> torch.Tensor:
        return flat_delta(state, start).double()

    sketcher = Sketcher(os.urandom(32))
    spaces: dict[str, Any] = {
        "parameters": lambda s, g: delta(s, g),
        "function": lambda s, g: function_space(s, g),
        "parameters_sketch": lambda s, g: sketcher.sketch(s, g)[0],
        "function_sketch": lambda s, g: sketcher.sketch(s, g)[1],
        "voter": lambda s, g: sketcher.sketch(s, g),  # `similarity`: what find_copy compares
    }
    d = {
        space: {("first", i): f(first[i], g0) for i in clients}
        | {("again", i): f(again[i], g0) for i in clients}
        | {("second", i): f(second[i], g1) for i in clients}
        for space, f in spaces.items()
    }
    honest: dict[str, Any] = {}
    for space, v in d.items():
        c = similarity if space == "voter" else cosine
        honest[space] = {
            "i_same_round_other_participant": pairs(
                {(i, j): c(v["first", i], v["first", j])
                 for i in clients for j in clients if i < j}
                | {(i, j, 1): c(v["second", i], v["second", j])
                   for i in clients for j in clients if i < j}
            ),
            "ii_same_participant_same_global_other_seed": pairs(
                {(i,): c(v["first", i], v["again", i]) for i in clients}
            ),
            "iii_next_round_vs_other_participants_earlier": pairs(
                {(i, j): c(v["second", i], v["first", j])
                 for i in clients for j in clients if i != j}
                | {(i, j, 0): c(v["again", i], v["first", j])
                   for i in clients for j in clients if i != j}
            ),
            "iv_same_participant_next_round": pairs(
                {(i,): c(v["second", i], v["first", i]) for i in clients}
            ),
        }  # fmt: skip
    for space in ("parameters", "function"):
        exact, sketched = d[space], d[f"{space}_sketch"]
        errors = [
            abs(cosine(sketched[a], sketched[b]) - cosine(exact[a], exact[b]))
            for a, b in itertools.combinations(exact, 2)
        ]
        honest[f"{space}_sketch_error"] = {"max": max(errors), "mean": sum(errors) / len(errors)}

    times = []
    for _ in range(5):
        tick = time.process_time()  # CPU time: the machine is shared
        sketcher.sketch(first[0], g0)
        times.append(time.process_time() - tick)
    sketch_s = sorted(times)[2]

    # ---- copies of participant 0's round-0 update, proposed in round 1 (from g1)
    author = first[0]
    author_delta = {k: author[k] - g0[k] for k in g0}
    load_adapter_state(run_model.model, g1)
    base_losses = example_losses(run_model.model, held_out, cfg.eval.batch_size, run_model.pad_id)

    def gain(state: State) -> float:
        load_adapter_state(run_model.model, state)
        losses = example_losses(run_model.model, held_out, cfg.eval.batch_size, run_model.pad_id)
        keep = ~(losses.isnan() | base_losses.isnan())
        return float((base_losses - losses)[keep].mean())

    generator = torch.Generator().manual_seed(args.seed)

    def noisy(rho: float) -> State:
        noise = {k: torch.randn(v.shape, generator=generator, dtype=torch.float64)
                 for k, v in author_delta.items()}  # fmt: skip
        scale = (
            rho * delta(author, g0).norm() / torch.cat([n.flatten() for n in noise.values()]).norm()
        )
        return {k: g1[k] + author_delta[k] + (scale * noise[k]).float() for k in g1}

    def reparametrized(eps: float) -> State:
        """The copy as (B M, M^-1 A) per LoRA module, M = I + eps * K: the same B A."""
        out = {k: g1[k] + author_delta[k] for k in g1}
        for key in [k for k in out if ".lora_A." in k]:
            b_key = key.replace(".lora_A.", ".lora_B.")
            rank = out[key].shape[0]
            m = torch.eye(rank, dtype=torch.float64) + eps * torch.randn(
                rank, rank, generator=generator, dtype=torch.float64
            )
            out[b_key] = (out[b_key].double() @ m).float()
            out[key] = torch.linalg.solve(m, out[key].double()).float()
        return out

    copies: dict[str, State] = {
        "author_in_its_round": author,
        "rewrapped_same_global": {k: g0[k] + author_delta[k] for k in g0},
        "applied_to_new_global": {k: g1[k] + author_delta[k] for k in g1},
        **{f"noise_{rho:g}x": noisy(rho) for rho in (0.1, 0.3, 0.5, 1.0, 2.0)},
        **{f"reparametrized_eps_{eps:g}": reparametrized(eps) for eps in (0.1, 0.5)},
        "mean_with_participant_1": {
            k: g1[k] + (author_delta[k] + first[1][k] - g0[k]) / 2 for k in g1
        },
        "honest_participant_1_next_round": second[1],
    }
    copy_rows = {}
    for name, state in copies.items():
        start = g0 if name in ("author_in_its_round", "rewrapped_same_global") else g1
        row = {"held_out_gain": gain(state) if start is g1 else None}
        for space, f in spaces.items():
            row[f"cosine_{space}"] = cosine(f(state, start), f(author, g0))
        row["voter_similarity"] = similarity(
            sketcher.sketch(state, start), sketcher.sketch(author, g0)
        )
        copy_rows[name] = row
        print(name, {k: round(v, 4) if v is not None else None for k, v in row.items()}, flush=True)
    author_gain_now = copy_rows["applied_to_new_global"]["held_out_gain"]

    # ---- norms against FLock's default bound
    bound = training_norm_bound(cfg.train, g0, cfg.fed.transport, cfg.fed.topk_fraction)
    ratios = [float(delta(s, g).norm()) / bound
              for s, g in [*[(first[i], g0) for i in clients], *[(again[i], g0) for i in clients],
                           *[(second[i], g1) for i in clients]]]  # fmt: skip
    noise100 = attack_update("noise", g0, first[0], 100.0, 7)
    huge = {k: torch.full_like(v, 1e30) for k, v in g0.items()}
    attacks = {}
    for name, state in (("noise_x100", noise100), ("all_1e30", huge)):
        verdict = validate_update(state, g0, 1, 1, bound, "FLock's default bound")
        attacks[name] = {
            "norm_over_bound": verdict.update_norm / bound,
            "refused": not verdict.accepted,
            "reason": verdict.reason,
        }
    result = {
        "command": "nice .venv/bin/python benchmarks/bench_voter_checks.py " + command_line(args),
        "machine": f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), "
        f"torch threads {torch.get_num_threads()}, shared",
        "torch": torch.__version__,
        "recipe": "tests/flock/test_protocol.py (tiny Llama)" if args.tiny else (
            "examples/flock-demo.toml"),
        "train": {"lr": cfg.train.lr, "max_steps": cfg.train.max_steps,
                  "batch_size": cfg.train.batch_size, "lora_r": cfg.lora.r,
                  "adapter_parameters": sum(v.numel() for v in g0.values()),
                  "clients": len(fed.clients), "scheme": "iid" if args.tiny else args.scheme},
        "honest_cosines": honest,
        "copies": copy_rows,
        "copy_gain_over_author_gain": {
            name: row["held_out_gain"] / author_gain_now
            for name, row in copy_rows.items()
            if row["held_out_gain"] is not None and author_gain_now
        },
        "norm_bound": {
            "bound": bound,
            "honest_norm_over_bound": {"min": min(ratios), "max": max(ratios)},
            "attacks": attacks,
        },
        "seconds": {
            "training": trained_s,
            "sketch_one_update_cpu_median_of_5": sketch_s,
            "total": time.perf_counter() - started,
        },
    }  # fmt: skip
    out = ROOT / "benchmarks" / "results" / f"voter_checks_{args.name}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("honest_cosines", "norm_bound")}, indent=2))


if __name__ == "__main__":
    main()
