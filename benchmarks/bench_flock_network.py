"""A FLock network on anvil, measured: where a round's time goes, gas, bytes.

Runs `covey flock devnet` in process (anvil with a block every second, one `covey flock join`
process per client file), then reads the chain's round boundaries and every participant's own
record (`state.json`: training metrics, ballot timing, per-round gas, bytes fetched and fetch
time) and reports per round:

- wall time (from the blocks that started consecutive rounds) split into the slowest
  proposer's training, the slowest voter's scoring, the slowest party's transfers, and the rest:
  chain waits (phase windows, transactions landing, polling);
- gas per participant per round (and for joining and settling, once per task);
- bytes moved: proposals published, and blobs fetched from other parties.

Writes benchmarks/results/flock_network.json.

    covey data split --clients 5 --out runs/flock5/data --overwrite
    .venv/bin/python benchmarks/bench_flock_network.py --data runs/flock5/data
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from covey.config import load_recipe
from covey.flock.devnet import run_devnet

ROOT = Path(__file__).resolve().parents[1]


def per_round(out: Path, status: dict[str, Any]) -> list[dict[str, Any]]:
    states = {
        folder.name: json.loads((folder / "state.json").read_text())
        for folder in sorted(out.glob("participant_*"))
    }
    starts = {t["round"]: t for t in status["timeline"]}
    end = status["timeline"][-1]
    rows = []
    for r in range(len(status["history"])):
        nxt = starts.get(r + 1, end)
        wall = nxt["time"] - starts[r]["time"]
        rounds = {name: s["rounds"].get(str(r), {}) for name, s in states.items()}
        costs = {name: s.get("costs", {}).get(str(r), {}) for name, s in states.items()}
        train = [e["proposal"]["training"].get("seconds", 0.0) for e in rounds.values()
                 if "proposal" in e]  # fmt: skip
        score = [e["ballot"]["seconds"] for e in rounds.values() if "ballot" in e]
        fetch = [c.get("fetch_s", 0.0) for c in costs.values()]
        gas = [c.get("gas", 0) for c in costs.values()]
        published = sum(e["proposal"].get("bytes", 0) for e in rounds.values() if "proposal" in e)
        fetched = sum(c.get("fetched_bytes", 0) for c in costs.values())
        critical = max(train, default=0.0) + max(score, default=0.0) + max(fetch, default=0.0)
        rows.append(
            {
                "round": r,
                "outcome": status["history"][r]["outcome"],
                "wall_s": wall,
                "train_s_max": max(train, default=0.0),
                "score_s_max": max(score, default=0.0),
                "transfer_s_max": max(fetch, default=0.0),
                "chain_wait_s": wall - critical,
                "gas_per_participant_mean": statistics.mean(gas),
                "gas_per_participant_max": max(gas),
                "bytes_published": published,
                "bytes_fetched": fetched,
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--recipe", default=str(ROOT / "examples" / "flock-demo.toml"))
    parser.add_argument("--data", default=str(ROOT / "runs" / "flock5" / "data"))
    parser.add_argument("--set", action="append", default=[], help="recipe override")
    parser.add_argument("--train-seconds", type=float, default=120.0)
    parser.add_argument(
        "--out", default=str(ROOT / "benchmarks" / "results" / "flock_network.json")
    )
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp()) / "devnet"
    cfg = load_recipe(args.recipe, [f"data.dir='{args.data}'", *args.set])
    started = time.perf_counter()
    status = run_devnet(cfg, folder, block_time_s=1, train_s=args.train_seconds)
    total = time.perf_counter() - started
    rows = per_round(folder, status)
    states = [json.loads(p.read_text()) for p in sorted(folder.glob("participant_*/state.json"))]
    once = {
        bucket: statistics.mean(s.get("costs", {}).get(bucket, {}).get("gas", 0) for s in states)
        for bucket in ("join", "settle")
    }
    result = {
        "command": "python benchmarks/bench_flock_network.py " + " ".join(sys.argv[1:]),
        "recipe": args.recipe,
        "participants": len(states),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}",
        "total_s": total,
        "phase": status["phase"],
        "rounds": rows,
        "gas_once_per_participant": once,
        "balances": status["balances"],
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    for row in rows:
        print(json.dumps(row))
    print(f"join gas {once['join']:.0f}, settle gas {once['settle']:.0f}; {total:.0f} s in all")


if __name__ == "__main__":
    main()
