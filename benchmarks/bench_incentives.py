"""What cheating gains a FLock party under FlockTask v2 (main 6617e05) and under v3 (today).

Plays every economic scenario of issue 26 (tests/flock/incentives.py: the majority that lies in
the last round, the stake-heavy voter that passes garbage, the copy after an empty round, the
creator that keeps the keeper fees, the squatter that exits at once, the last revealer that
grinds the draw) on the embedded chain under both contracts, each once honestly and once with
the cheat, and records the cheating party's net both ways and the gain (tokens; for the
grinding scenario the attacker's proposer share in percent). tests/flock/test_incentives.py
asserts the same scenarios (gain > 0 under v2, <= 0 under v3).

Also tabulates the trust bound of v3's vote: the chance that a uniform draw of a round's voters
from n members gives a coalition of f of them more than threshold_pct of the seats (then it
decides that round's verdicts). Writes benchmarks/results/incentives.json.

    .venv/bin/python benchmarks/bench_incentives.py
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from math import comb
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the scenarios use the chain tier's drivers (tests/flock)

from tests.flock import World  # noqa: E402
from tests.flock.incentives import RULES, SCENARIOS  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "incentives.json"


def majority_chance(members: int, coalition: int, voters: int, threshold_pct: int = 50) -> float:
    """P(more than threshold_pct of `voters` seats go to the coalition) for a uniform draw of
    `voters` of `members` (hypergeometric), as FlockTask v3 draws them."""
    need = voters * threshold_pct // 100 + 1
    total = comb(members, voters)
    return (
        sum(
            comb(coalition, k) * comb(members - coalition, voters - k)
            for k in range(need, min(coalition, voters) + 1)
        )
        / total
    )


def trust_table(members: int = 20) -> list[dict[str, Any]]:
    rows = []
    for coalition in (2, 4, 6, 8, 10):
        row: dict[str, Any] = {"members": members, "coalition": coalition}
        for voters in (3, 5, 7, 9):
            row[f"voters_{voters}"] = round(majority_chance(members, coalition, voters), 4)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--only", default="", help="run the scenarios whose name contains this")
    args = parser.parse_args()
    started = time.perf_counter()
    w = World.create(accounts=14)
    scenarios = []
    for name, play in SCENARIOS.items():
        if args.only and args.only not in name:
            continue
        row: dict[str, Any] = {"scenario": name}
        for rules in RULES:
            w.reset()
            outcome = play(w, rules)
            row[rules] = outcome.as_json()
        scenarios.append(row)
        print(f"{name}: gain v2 {row['v2']['gain']:+.2f}, v3 {row['v3']['gain']:+.2f}", flush=True)
    out = {
        "command": " ".join([".venv/bin/python benchmarks/bench_incentives.py", *sys.argv[1:]]),
        "units": "tokens (the grinding scenario: the attacker's proposer share, percent)",
        "scenarios": scenarios,
        "trust_bound": {
            "what": "chance that a uniform draw gives a coalition of f of n members more than "
            "half of a round's voter seats (threshold_pct 50)",
            "rows": trust_table(),
        },
        "wall_s": round(time.perf_counter() - started, 1),
        "python": platform.python_version(),
    }
    RESULTS.write_text(json.dumps(out, indent=2) + "\n")
    print("| scenario | v2: honest / cheat / gain | v3: honest / cheat / gain |")
    print("|---|---|---|")
    for row in scenarios:
        cells = [
            f"{row[r]['honest']:.2f} / {row[r]['cheat']:.2f} / **{row[r]['gain']:+.2f}**"
            for r in RULES
        ]
        print(f"| {row['scenario']} | {cells[0]} | {cells[1]} |")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
