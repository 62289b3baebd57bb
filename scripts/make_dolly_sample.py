"""Regenerate the Dolly sample bundled with Covey (src/covey/resources/dolly_sample.jsonl).

Draws 50 records per category (400 in all) from the Dolly subset in ../shared/data/dolly,
preferring short records (instruction + context + response <= 800 characters) so the CPU
demo trains quickly; a category with too few short records (closed_qa) gives its shortest.
Usage: python scripts/make_dolly_sample.py [SOURCE.jsonl]
"""

import json
import random
import sys
from pathlib import Path

PER_CATEGORY = 50
MAX_CHARS = 800
SEED = 42

root = Path(__file__).resolve().parents[1]
source = (
    Path(sys.argv[1])
    if len(sys.argv) > 1
    else root.parent / "shared/data/dolly/dolly-train-11k.jsonl"
)
records = [
    json.loads(line) for line in source.read_text(encoding="utf-8").splitlines() if line.strip()
]
by_category: dict[str, list[dict]] = {}
for r in records:
    by_category.setdefault(r["category"], []).append(r)
rng = random.Random(SEED)
sample = []
for category in sorted(by_category):
    rows = sorted(
        by_category[category], key=lambda r: len(r["instruction"] + r["context"] + r["response"])
    )
    short = [r for r in rows if len(r["instruction"] + r["context"] + r["response"]) <= MAX_CHARS]
    sample += rng.sample(short, PER_CATEGORY) if len(short) >= PER_CATEGORY else rows[:PER_CATEGORY]
rng.shuffle(sample)
out = root / "src/covey/resources/dolly_sample.jsonl"
fields = ("instruction", "context", "response", "category")
out.write_text(
    "".join(json.dumps({k: r[k] for k in fields}, ensure_ascii=False) + "\n" for r in sample),
    encoding="utf-8",
)
print(f"wrote {len(sample)} records to {out}")
