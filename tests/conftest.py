"""Shared fixtures: tiny instruction datasets written in every supported format."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from covey.config import RunConfig, load_recipe

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


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Run the longest tests first, each on a worker of its own.

    `make test` spreads the tests over pytest-xdist workers, which take them in this order: the
    tests that take minutes (mostly waiting on blocks, servers and child processes) start at
    once beside each other and the many short ones fill the gaps, instead of one long test
    starting last and holding the run open alone. A test that raises its own time limit
    (`@pytest.mark.timeout(seconds)`) is one of those, longest limit first; then the slower
    tiers. The sort is stable, so a file's tests keep their order within a tier.

    xdist's load scheduling (with `--maxschedchunk 1`, as `make test` runs it) hands each worker
    two tests to start with, in this order, then one at a time: so each long test is paired
    with a short one, or the first worker would get two long tests and run them one after the
    other.
    """

    def limit(item: pytest.Item) -> float:
        marker = item.get_closest_marker("timeout")
        return float(marker.args[0] if marker.args else marker.kwargs["timeout"]) if marker else 0

    def order(item: pytest.Item) -> tuple[float, int]:
        tier = next(
            (rank for rank, name in enumerate(TIERS) if item.get_closest_marker(name)), len(TIERS)
        )
        return (-limit(item), tier)

    items.sort(key=order)
    long = [item for item in items if limit(item)]
    rest = items[len(long) :]
    paired = [i for k, item in enumerate(long) for i in (item, *rest[k : k + 1])]
    items[:] = paired + rest[len(long) :]


TIERS = ("slow", "flower", "browser", "chain")
"""The marked tiers, slowest first (pyproject.toml's markers)."""


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


def tiny_recipe(tiny_model_dir: Path, client_data_dir: Path, out: Path, *sets: str) -> RunConfig:
    """The engine tests' tiny recipe (tests/fed/test_engine.py), cut to 2 rounds."""
    return load_recipe(
        None,
        [
            f"model.base='{tiny_model_dir}'",
            f"data.dir='{client_data_dir}'",
            f"run.out='{out}'",
            "lora.r=4",
            "lora.alpha=8",
            "lora.dropout=0.0",
            "prompt.template=chat",
            "prompt.cutoff_len=128",
            "train.epochs=2",
            "train.batch_size=8",
            "train.micro_batch_size=8",
            "train.lr=3e-2",
            "fed.rounds=2",
            "eval.sample_instructions=1",
            "eval.max_new_tokens=4",
            *sets,
        ],
    )


@pytest.fixture(scope="session")
def tiny_run(
    tiny_model_dir: Path, client_data_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """A complete 2-round run folder: config.toml, round_000..002, final/, metrics, loss.png."""
    from covey.fed import engine
    from covey.model.loading import base_model_id, load_base_model

    out = tmp_path_factory.mktemp("serve-run") / "run"
    cfg = tiny_recipe(tiny_model_dir, client_data_dir, out)
    model, tokenizer = load_base_model(cfg.model)
    fed = engine.prepare(cfg, model, tokenizer, base_model_id(cfg.model))
    engine.run_federated(cfg, fed)
    return out
