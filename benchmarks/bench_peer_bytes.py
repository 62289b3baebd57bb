"""What the limits on peer bytes cost: reading an honest proposal's header, and the most a
hostile one within the limits can make a reader spend before it is refused.

Each case is timed as CPU time of this process (the cores are shared), best of `--repeats`:

- honest: the header of a rank-16 LoRA on all seven linear modules of a 70B model (80 layers),
  sent int8+topk (3,360 tensors, 448 kB), read by `read_header`;
- the issue's blob (100,000 `[`), refused by the depth scan;
- 1 MiB headers within the depth limit built to be slow to scan or parse (every byte a bracket,
  an escape or a string), each refused by a later check;
- a 32 KiB bundle recipe built to be slow to scan, refused or read by `TaskBundle.config`.

Writes benchmarks/results/peer_bytes.json.

    .venv/bin/python benchmarks/bench_peer_bytes.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

from covey.errors import DataError
from covey.fed.transport import INDEX, SCALE
from covey.flock.bundle import MAX_RECIPE_BYTES, TaskBundle
from covey.store.updates import DTYPES, MAX_HEADER_BYTES, read_header

ROOT = Path(__file__).resolve().parents[1]
MODULES = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]  # fmt: skip


def safetensors_bytes(header: bytes) -> bytes:
    """`header` as a safetensors file with no tensor data."""
    return len(header).to_bytes(8, "little") + header


def lora_blob(layers: int, rank: int, hidden: int) -> bytes:
    """A LoRA on every linear module, sent int8+topk (values, indices and a scale per matrix,
    a tenth of the entries kept), with PEFT's names: the header and zeros for the data."""
    metadata = {"format": "covey-flock-update/2", "transport": "int8+topk", "reference": "b" * 59}
    header: dict[str, object] = {"__metadata__": metadata}
    at = 0
    for layer in range(layers):
        for module in MODULES:
            for matrix in "AB":
                key = f"base_model.model.model.layers.{layer}.{module}.lora_{matrix}.weight"
                kept = rank * hidden // 10
                for name, dtype, count in ((key, "I8", kept), (key + INDEX, "I32", kept),
                                           (key + SCALE, "F32", 1)):  # fmt: skip
                    size = DTYPES[dtype] * count
                    header[name] = {
                        "dtype": dtype,
                        "shape": [count],
                        "data_offsets": [at, at + size],
                    }
                    at += size
    return safetensors_bytes(json.dumps(header, separators=(",", ":")).encode()) + bytes(at)


def bundle_bytes(recipe: str) -> bytes:
    fields = {"base_model": "m", "base_weights_sha256": "0" * 64, "initial_adapter": "b"}
    return json.dumps({"format": "covey-task/1", "recipe": recipe, **fields}).encode()


def cpu_seconds(read: Callable[[], object], repeats: int) -> tuple[float, str]:
    """Best CPU time of `repeats` calls, and what the call did (read, or the refusal)."""
    best = float("inf")
    outcome = ""
    for _ in range(repeats):
        started = time.process_time()
        try:
            read()
            outcome = "read"
        except DataError as e:
            outcome = f"refused: {str(e)[:100]}"
        best = min(best, time.process_time() - started)
    return best, outcome


def fill(pattern: str, size: int, prefix: str = "", suffix: str = "") -> str:
    """`prefix` + `pattern` repeated + spaces + `suffix`, `size` characters in all."""
    room = size - len(prefix) - len(suffix)
    return prefix + pattern * (room // len(pattern)) + " " * (room % len(pattern)) + suffix


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    n = MAX_HEADER_BYTES
    blobs = {
        "honest: 70B all-linear LoRA, int8+topk (3,360 tensors)": lora_blob(80, 16, 8192),
        "the issue: 100,000 [": safetensors_bytes(b"[" * 100_000),
        "1 MiB of [], [], ... (depth 3)": safetensors_bytes(
            fill("[],", n, '{"t":[', "[]]}").encode()
        ),
        '1 MiB of escaped quotes in a name (\\")': safetensors_bytes(
            fill('\\"', n, '{"', '":1}').encode()
        ),
        '1 MiB of empty strings ("",) in a shape': safetensors_bytes(
            fill('"",', n, '{"t":{"dtype":"F32","shape":[', '""]}}').encode()
        ),
        "1 MiB of spaces": safetensors_bytes(b"{}" + b" " * (n - 2)),
    }
    rows = []
    for name, data in blobs.items():
        seconds, outcome = cpu_seconds(lambda data=data: read_header(data), args.repeats)
        header_bytes = int.from_bytes(data[:8], "little")
        rows.append({"case": name, "header_bytes": header_bytes, "cpu_s": round(seconds, 4),
                     "outcome": outcome})  # fmt: skip
        print(f"{name}: {seconds * 1000:.1f} ms CPU, {outcome[:60]}", flush=True)
    recipes = {
        "32 KiB recipe of [[],[],...] (depth 2)": fill("[],", MAX_RECIPE_BYTES, "x = [", "[]]"),
        "32 KiB recipe of dotted keys": "".join(f"a.k{i} = 1\n" for i in range(2_600)),
        '32 KiB recipe of "\\"" strings': fill('"\\"",', MAX_RECIPE_BYTES, "x = [", '""]'),
    }
    for name, recipe in recipes.items():
        data = bundle_bytes(recipe)
        seconds, outcome = cpu_seconds(
            lambda data=data: TaskBundle.from_bytes(data).config(), args.repeats
        )
        rows.append({"case": name, "bytes": len(recipe), "cpu_s": round(seconds, 4),
                     "outcome": outcome})  # fmt: skip
        print(f"{name}: {seconds * 1000:.1f} ms CPU, {outcome[:60]}", flush=True)
    result = {
        "command": " ".join([".venv/bin/python benchmarks/bench_peer_bytes.py", *sys.argv[1:]]),
        "setup": f"CPU time of this process, best of {args.repeats}; header limit "
        f"{MAX_HEADER_BYTES:,} bytes, recipe limit {MAX_RECIPE_BYTES:,}",
        "results": rows,
        "machine": f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()})",
        "python": platform.python_version(),
    }
    out = ROOT / "benchmarks" / "results" / "peer_bytes.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
