"""Shared fixtures: tiny instruction datasets written in every supported format."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

CATEGORIES = [
    "brainstorming",
    "classification",
    "closed_qa",
    "creative_writing",
    "general_qa",
    "information_extraction",
    "open_qa",
    "summarization",
]


def dolly_records(
    per_category: int = 20, categories: list[str] = CATEGORIES
) -> list[dict[str, Any]]:
    """Distinct Dolly-format records, `per_category` of each category, interleaved."""
    return [
        {
            "instruction": f"Question {i} about {c}?",
            "context": "" if i % 3 else f"Some context for {c} {i}.",
            "response": f"Answer {i} for {c}.",
            "category": c,
        }
        for i in range(per_category)
        for c in categories
    ]


def write_records(path: Path, records: list[dict[str, Any]]) -> Path:
    """Write `records` in the format named by `path`'s suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    elif path.suffix == ".json":
        path.write_text(json.dumps(records), encoding="utf-8")
    elif path.suffix == ".csv":
        fields = list(dict.fromkeys(k for r in records for k in r))
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(records)
    elif path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(records), path)
    else:
        raise ValueError(path)
    return path


@pytest.fixture
def dolly_file(tmp_path: Path) -> Callable[..., Path]:
    """Factory: `dolly_file(per_category=20, name="data.jsonl")` writes a fixture file."""

    def make(per_category: int = 20, name: str = "data.jsonl", **kwargs: Any) -> Path:
        return write_records(tmp_path / name, dolly_records(per_category, **kwargs))

    return make


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer Llama with a byte-level tokenizer, saved once per test session."""
    from tests.model.tiny import make_tiny_model_dir

    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def client_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`covey data split` output: 3 clients (dirichlet) and 16 test records, from fixture data."""
    from covey.data.split import SplitConfig, run_split

    root = tmp_path_factory.mktemp("fed-data")
    source = write_records(root / "source.jsonl", dolly_records(per_category=8))
    out = root / "split"
    run_split(SplitConfig(input=str(source), out=out, clients=3, min_size=5, test_per_category=2))
    return out
