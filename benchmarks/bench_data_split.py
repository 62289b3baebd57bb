"""Time `covey data split` on the Dolly subset (11,201 records) as a user runs it.

Runs the real CLI in a fresh process per repetition (start-up included), after one warm-up,
and records the median wall time, the spread, peak RSS and the count check to
benchmarks/results/data_split.json.

    .venv/bin/python benchmarks/bench_data_split.py [--input FILE] [--clients N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--input", default=str(ROOT.parent / "shared/data/dolly/dolly-train-11k.jsonl")
    )
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    out = Path(tempfile.mkdtemp()) / "split"
    command = [sys.executable, "-m", "covey", "data", "split", "--input", args.input]
    command += ["--clients", str(args.clients), "--scheme", "dirichlet", "--out", str(out)]
    command += ["--overwrite"]
    times = []
    for i in range(args.repeats + 1):
        start = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        if i:  # the first run warms the file cache and imports
            times.append(time.perf_counter() - start)
    peak_rss_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024

    manifest = json.loads((out / "manifest.json").read_text())
    clients_total = sum(c["count"] for c in manifest["clients"])
    dropped = manifest["duplicates"]["count"] if manifest["duplicates"]["dropped"] else 0
    expected = manifest["source"]["records"] - manifest["test"]["count"] - dropped
    result = {
        "command": " ".join(["covey", *command[3:]])
        .replace(args.input, os.path.relpath(args.input, ROOT))
        .replace(str(out), "<tmp>/split"),
        "wall_s_median": round(statistics.median(times), 3),
        "wall_s_min": round(min(times), 3),
        "wall_s_max": round(max(times), 3),
        "repeats": args.repeats,
        "peak_rss_mb": round(peak_rss_mb, 1),
        "records": manifest["source"]["records"],
        "test_records": manifest["test"]["count"],
        "duplicates": manifest["duplicates"]["count"],
        "client_records": clients_total,
        "counts_add_up": clients_total == expected,
        "machine": {"cpu": cpu_model(), "cores": len(os.sched_getaffinity(0))},
        "python": platform.python_version(),
    }
    results = ROOT / "benchmarks" / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / "data_split.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
