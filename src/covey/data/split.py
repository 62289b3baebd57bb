"""`covey data split`: one private training file per client plus a held-out global test set.

Reads top to bottom: check settings, load and validate, handle duplicates, sort by category,
hold out the test set, partition the rest, write everything into a staging folder that
replaces the output folder only when complete.

Output folder:
    client_<i>.jsonl   each client's training records (canonical fields + source `id`)
    test.jsonl         the global held-out test set
    manifest.json      settings, source hash, counts per client and category, file hashes
    distribution.png   per-client category composition
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from covey import __version__
from covey.atomic import atomic_directory, check_output_dir
from covey.config import DEFAULT_DATA_DIR
from covey.data.partition import (
    Scheme,
    check_min_size,
    partition_categories,
    partition_dirichlet,
    partition_iid,
    partition_shards,
    split_test,
)
from covey.data.records import Dataset, Record, load_records
from covey.errors import ConfigError

BUNDLED_SAMPLE = "bundled:dolly-sample"
"""`--input` default: 400 Dolly records shipped with the package (see resources/README.md)."""
_MAX_SEED = 2**32 - 1  # numpy's RandomState takes 32-bit seeds


def bundled_sample_path() -> Path:
    return Path(str(resources.files("covey") / "resources" / "dolly_sample.jsonl"))


@dataclass
class SplitConfig:
    """Settings of one data allocation; every field is a `covey data split` flag."""

    input: str = BUNDLED_SAMPLE
    """A .json/.jsonl/.csv/.parquet file or a Hugging Face dataset id."""
    out: Path = Path(DEFAULT_DATA_DIR)
    """Output folder (by default where `covey train` looks: `data.dir`'s default); replaced
    atomically, refused if non-empty unless `overwrite`."""
    clients: int = 4
    """Number of clients."""
    scheme: Scheme = Scheme.dirichlet
    """shards | dirichlet | iid | categories."""
    seed: int = 42
    """Seed of every random choice (Shepherd's default)."""
    alpha: float = 0.5
    """Dirichlet concentration for `dirichlet`; smaller is more skewed."""
    min_size: int = 40
    """Every client gets at least this many training records (Shepherd: 40)."""
    test_per_category: int | None = 10
    """Held-out records per category (Shepherd: 10)."""
    test_fraction: float | None = None
    """Held-out fraction of each category instead of a fixed count."""
    test_from: str | None = None
    """Use this file as the test set and hold out nothing from `input`."""
    categories_per_client: int = 2
    """Categories each client holds under `categories`."""
    quantity_skew: float | None = None
    """Dirichlet(beta) client sizes for `iid` and `categories`; smaller is more unequal."""
    field_map: dict[str, str] = field(default_factory=dict)
    """Field renames applied before format detection, e.g. {"question": "instruction"}."""
    dedup: bool = False
    """Drop repeated records (same instruction, context and response), keeping the first."""
    overwrite: bool = False
    """Replace a non-empty output folder."""


@dataclass
class Allocation:
    """The result of a split, before anything is written."""

    clients: list[list[Record]]
    test: list[Record]
    manifest: dict[str, Any]


def run_split(cfg: SplitConfig) -> dict[str, Any]:
    """Allocate the data and write the output folder; return the manifest."""
    check_output_dir(cfg.out, cfg.overwrite)  # fail before the work, not after
    allocation = allocate(cfg)
    write_allocation(allocation, cfg.out, cfg.overwrite)
    return allocation.manifest


def allocate(cfg: SplitConfig) -> Allocation:
    """Load, validate and partition the data (reads files, writes nothing)."""
    cfg = _checked(cfg)
    source = str(bundled_sample_path()) if cfg.input == BUNDLED_SAMPLE else cfg.input
    dataset = load_records(source, cfg.field_map)
    test_dataset = load_records(cfg.test_from, cfg.field_map) if cfg.test_from else None

    duplicates = find_duplicates(dataset.records)
    records = dataset.records
    if cfg.dedup:
        dropped = {dup for dup, _ in duplicates}
        records = [r for r in records if r.id not in dropped]
    # Shepherd sorts by category before anything random happens (we sort stably: see partition)
    records = sorted(records, key=lambda r: r.category)
    categories = [r.category for r in records]

    rs = np.random.RandomState(cfg.seed)  # Shepherd: np.random.seed(42) on the global state
    if test_dataset is not None:
        test, train_positions = list(test_dataset.records), list(range(len(records)))
    else:
        test_positions, train_positions = split_test(
            categories, rs, cfg.test_per_category, cfg.test_fraction
        )
        test = [records[p] for p in test_positions]
        if not test:
            raise ConfigError(
                f"the test set is empty: --test-fraction {cfg.test_fraction} rounds to 0 "
                "records in every category, and training evaluates every round on the test "
                "set; raise it or use --test-per-category K"
            )
    train = [records[p] for p in train_positions]
    parts = _partition(cfg, [r.category for r in train], rs)

    clients = [[train[p] for p in part] for part in parts]
    manifest = _manifest(cfg, dataset, test_dataset, duplicates, train, test, clients)
    return Allocation(clients=clients, test=test, manifest=manifest)


def find_duplicates(records: list[Record]) -> list[tuple[int, int]]:
    """`(duplicate_id, first_id)` for each record whose instruction, context and response
    (whitespace-trimmed) repeat an earlier record's; the category does not count."""
    first_seen: dict[tuple[str, str, str], int] = {}
    duplicates = []
    for r in records:
        key = (r.instruction.strip(), r.context.strip(), r.response.strip())
        if key in first_seen:
            duplicates.append((r.id, first_seen[key]))
        else:
            first_seen[key] = r.id
    return duplicates


def _checked(cfg: SplitConfig) -> SplitConfig:
    """Validate the settings; return a normalized copy (the caller's object is not changed)."""
    try:
        scheme = Scheme(cfg.scheme)
    except ValueError:
        known = ", ".join(s.value for s in Scheme)
        raise ConfigError(f"--scheme {cfg.scheme!r} is unknown; choose one of {known}") from None
    if cfg.clients < 1:
        raise ConfigError(f"--clients must be at least 1 (got {cfg.clients})")
    if cfg.min_size < 1:
        raise ConfigError(f"--min-size must be at least 1 (got {cfg.min_size})")
    if cfg.alpha <= 0:
        raise ConfigError(f"--alpha must be > 0 (got {cfg.alpha}); 0.5 is Shepherd's default")
    if cfg.quantity_skew is not None and scheme not in (Scheme.iid, Scheme.categories):
        raise ConfigError(
            f"--quantity-skew applies to the iid and categories schemes, not {scheme.value} "
            "(shards are equal by design; dirichlet sizes already vary with --alpha)"
        )
    if cfg.quantity_skew is not None and cfg.quantity_skew <= 0:
        raise ConfigError(f"--quantity-skew must be > 0 (got {cfg.quantity_skew})")
    if cfg.test_from is not None and cfg.test_fraction is not None:
        raise ConfigError("--test-from and --test-fraction exclude each other; choose one")
    if cfg.test_fraction is not None and not 0 < cfg.test_fraction < 1:
        raise ConfigError(f"--test-fraction must be between 0 and 1 (got {cfg.test_fraction})")
    if not 0 <= cfg.seed <= _MAX_SEED:
        raise ConfigError(
            f"--seed {cfg.seed}: expected 0 .. {_MAX_SEED} (numpy's seed range); "
            "42 is Shepherd's default"
        )
    # a test fraction or test file replaces the per-category default
    per_category = None if cfg.test_fraction or cfg.test_from else cfg.test_per_category
    if per_category is not None and per_category < 1:
        raise ConfigError(
            f"--test-per-category {per_category} holds out no test records, but training "
            "evaluates every round on the test set; use 1 or more (Shepherd: 10), "
            "--test-fraction F or --test-from FILE"
        )
    return replace(cfg, scheme=scheme, test_per_category=per_category, out=Path(cfg.out))


def _partition(
    cfg: SplitConfig, categories: list[str], rs: np.random.RandomState
) -> list[list[int]]:
    n = len(categories)
    if n < cfg.clients:
        raise ConfigError(
            f"{n} training records cannot be shared among {cfg.clients} clients; "
            "use fewer --clients"
        )
    # dirichlet and iid meet --min-size by construction; the other two are checked after
    if cfg.scheme is Scheme.dirichlet:
        return partition_dirichlet(categories, cfg.clients, cfg.alpha, cfg.min_size, rs)
    if cfg.scheme is Scheme.iid:
        return partition_iid(n, cfg.clients, rs, cfg.quantity_skew, cfg.min_size)
    if cfg.scheme is Scheme.shards:
        # Shepherd shuffles shards with Python's `random`, seeded separately with the same seed
        parts = partition_shards(n, cfg.clients, random.Random(cfg.seed))
    else:
        parts = partition_categories(
            categories, cfg.clients, cfg.categories_per_client, rs, cfg.quantity_skew
        )
    check_min_size(parts, cfg.min_size, cfg.scheme)
    return parts


def _manifest(
    cfg: SplitConfig,
    dataset: Dataset,
    test_dataset: Dataset | None,
    duplicates: list[tuple[int, int]],
    train: list[Record],
    test: list[Record],
    clients: list[list[Record]],
) -> dict[str, Any]:
    settings = asdict(cfg)
    settings["out"] = str(cfg.out)
    settings["scheme"] = cfg.scheme.value
    category_names = sorted({r.category for r in train} | {r.category for r in test})
    return {
        "covey_version": __version__,
        "scheme": cfg.scheme.value,
        "seed": cfg.seed,
        "settings": settings,
        "source": {
            "input": cfg.input,
            "sha256": dataset.sha256,
            "format": dataset.format,
            "records": len(dataset.records),
        },
        "test_source": None
        if test_dataset is None
        else {"input": cfg.test_from, "sha256": test_dataset.sha256, "format": test_dataset.format},
        "duplicates": {
            "count": len(duplicates),
            "dropped": cfg.dedup,
            "examples": [{"id": d, "same_as": f} for d, f in duplicates[:20]],
        },
        "categories": category_names,
        "train_records": len(train),
        "test": {"file": "test.jsonl", "count": len(test), "by_category": _counts(test)},
        "clients": [
            {
                "client": i,
                "file": f"client_{i}.jsonl",
                "count": len(rows),
                "by_category": _counts(rows),
            }
            for i, rows in enumerate(clients)
        ],
    }


def _counts(records: list[Record]) -> dict[str, int]:
    return dict(sorted(Counter(r.category for r in records).items()))


def write_allocation(allocation: Allocation, out: Path, overwrite: bool = False) -> None:
    """Write the client files, test set, manifest (with file hashes) and figure atomically."""
    from covey.data.plot import plot_distribution  # matplotlib loads only when writing

    manifest = allocation.manifest
    files = {f"client_{i}.jsonl": rows for i, rows in enumerate(allocation.clients)}
    files["test.jsonl"] = allocation.test
    with atomic_directory(out, overwrite=overwrite) as staging:
        manifest["files_sha256"] = {}
        for name, rows in files.items():
            data = "".join(json.dumps(r.to_json(), ensure_ascii=False) + "\n" for r in rows)
            encoded = data.encode("utf-8")
            (staging / name).write_bytes(encoded)
            manifest["files_sha256"][name] = hashlib.sha256(encoded).hexdigest()
        plot_distribution(manifest, staging / "distribution.png")
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
