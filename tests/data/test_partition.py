"""Properties of each partition scheme, through `run_split` on fixture files."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from covey.data.partition import (
    Scheme,
    client_sizes,
    partition_categories,
    partition_dirichlet,
    partition_iid,
    partition_shards,
)
from covey.data.split import SplitConfig, allocate, run_split
from covey.errors import CoveyError
from tests.conftest import CATEGORIES


def split(source: Path, out: Path, **settings: Any) -> tuple[dict, list[list[dict]], list[dict]]:
    """Allocate without writing (the writing is tested in test_split.py)."""
    allocation = allocate(SplitConfig(input=str(source), out=out, **settings))
    clients = [[r.to_json() for r in rows] for rows in allocation.clients]
    return allocation.manifest, clients, [r.to_json() for r in allocation.test]


SCHEMES: list[dict[str, Any]] = [
    {"scheme": Scheme.shards},
    {"scheme": Scheme.dirichlet},
    {"scheme": Scheme.dirichlet, "alpha": 0.1},
    {"scheme": Scheme.iid},
    {"scheme": Scheme.iid, "quantity_skew": 0.5},
    {"scheme": Scheme.categories},
    {"scheme": Scheme.categories, "categories_per_client": 3, "quantity_skew": 1.0},
]


@pytest.mark.parametrize("settings", SCHEMES, ids=lambda s: "-".join(map(str, s.values())))
def test_clients_are_disjoint_and_cover_the_training_rows(
    dolly_file: Callable[..., Path], tmp_path: Path, settings: dict[str, Any]
) -> None:
    source = dolly_file(per_category=40)  # 320 records
    manifest, clients, test = split(source, tmp_path / "out", clients=4, min_size=10, **settings)

    ids = [r["id"] for rows in clients for r in rows]
    test_ids = {r["id"] for r in test}
    assert len(ids) == len(set(ids)), "a row went to two clients"
    assert set(ids) | test_ids == set(range(320)) and not set(ids) & test_ids
    assert len(test) == 80 and manifest["test"]["by_category"] == dict.fromkeys(CATEGORIES, 10)
    assert [c["count"] for c in manifest["clients"]] == [len(rows) for rows in clients]
    assert manifest["train_records"] == sum(map(len, clients)) == 240
    assert min(map(len, clients)) >= 10


@pytest.mark.parametrize("settings", SCHEMES, ids=lambda s: "-".join(map(str, s.values())))
def test_same_seed_same_split_other_seed_other_split(
    dolly_file: Callable[..., Path], tmp_path: Path, settings: dict[str, Any]
) -> None:
    source = dolly_file(per_category=40)
    runs = [
        split(source, tmp_path / name, clients=4, min_size=10, seed=seed, **settings)[1]
        for name, seed in (("a", 7), ("b", 7), ("c", 8))
    ]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_shards_have_equal_sizes_and_few_categories(
    dolly_file: Callable[..., Path], tmp_path: Path
) -> None:
    # 8 categories x 50 rows, 10 held out each: 320 sorted rows = 8 shards of exactly one category
    _, clients, _ = split(
        dolly_file(per_category=50), tmp_path / "o", clients=4, scheme=Scheme.shards
    )
    assert [len(rows) for rows in clients] == [80] * 4
    assert all(len({r["category"] for r in rows}) <= 2 for rows in clients)


def test_dirichlet_skews_categories_more_than_iid(
    dolly_file: Callable[..., Path], tmp_path: Path
) -> None:
    source = dolly_file(per_category=60)

    def mean_max_share(scheme: Scheme) -> float:
        manifest, _, _ = split(
            source, tmp_path / scheme.value, clients=5, min_size=5, scheme=scheme
        )
        return float(
            np.mean([max(c["by_category"].values()) / c["count"] for c in manifest["clients"]])
        )

    assert mean_max_share(Scheme.dirichlet) > 1.5 * mean_max_share(Scheme.iid)


def test_dirichlet_respects_min_size_and_fair_share_cap() -> None:
    categories = sorted(CATEGORIES * 50)
    for seed in range(5):
        parts = partition_dirichlet(categories, 6, 0.5, 30, np.random.RandomState(seed))
        assert min(map(len, parts)) >= 30
        assert sorted(p for part in parts for p in part) == list(range(400))


def test_dirichlet_impossible_min_size_errors_instead_of_looping() -> None:
    categories = sorted(CATEGORIES * 10)  # 80 rows
    with pytest.raises(CoveyError, match="cannot give 5 clients at least 20"):
        partition_dirichlet(categories, 5, 0.5, 20, np.random.RandomState(0))
    # feasible on paper (8 x 10 = 80) but Dirichlet draws essentially never hit exact equality
    with pytest.raises(CoveyError, match=r"after 50 draws .* lower --min-size"):
        partition_dirichlet(categories, 8, 0.5, 10, np.random.RandomState(0), max_attempts=50)


def test_iid_quantity_skew_makes_sizes_unequal() -> None:
    rs = np.random.RandomState(0)
    equal = partition_iid(1000, 10, rs)
    skewed = partition_iid(1000, 10, rs, quantity_skew=0.3, min_size=20)
    assert max(map(len, equal)) - min(map(len, equal)) <= 1
    assert max(map(len, skewed)) > 3 * min(map(len, skewed)) and min(map(len, skewed)) >= 20
    assert sorted(p for part in skewed for p in part) == list(range(1000))


def test_client_sizes_sum_exactly() -> None:
    for seed in range(20):
        sizes = client_sizes(997, 7, np.random.RandomState(seed), 0.7, 13)
        assert sum(sizes) == 997 and min(sizes) >= 13


def test_categories_scheme_gives_each_client_k_categories_and_covers_all() -> None:
    categories = sorted(CATEGORIES * 30)
    parts = partition_categories(categories, 4, 2, np.random.RandomState(1))
    held = [{categories[p] for p in part} for part in parts]
    assert all(len(h) == 2 for h in held)
    assert set().union(*held) == set(CATEGORIES)  # 4 x 2 = 8: every category, whole, to one client
    assert all(len(part) == 60 for part in parts)
    parts = partition_categories(categories, 6, 3, np.random.RandomState(1))
    assert all(len({categories[p] for p in part}) == 3 for part in parts)
    assert sorted(p for part in parts for p in part) == list(range(240))


def test_categories_scheme_refuses_to_drop_categories() -> None:
    with pytest.raises(CoveyError, match="cannot cover all 8 categories"):
        partition_categories(sorted(CATEGORIES * 5), 3, 2, np.random.RandomState(0))
    with pytest.raises(CoveyError, match=r"choose 1\.\.8"):
        partition_categories(sorted(CATEGORIES * 5), 3, 9, np.random.RandomState(0))


def test_shards_need_two_rows_per_client() -> None:
    with pytest.raises(CoveyError, match="cannot fill 10 shards"):
        partition_shards(9, 5, __import__("random").Random(0))


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({"alpha": 0}, "--alpha must be > 0"),
        ({"alpha": -1.0}, "--alpha must be > 0"),
        ({"scheme": "round-robin"}, "--scheme 'round-robin' is unknown"),
        ({"clients": 0}, "--clients must be at least 1"),
        ({"clients": 500, "min_size": 1}, "cannot be shared among 500 clients"),
        ({"clients": 50}, "cannot give 50 clients at least 40"),
        ({"scheme": Scheme.shards, "clients": 10}, "fewer than --min-size 40"),
        ({"scheme": Scheme.shards, "quantity_skew": 0.5}, "--quantity-skew applies to the iid"),
        ({"scheme": Scheme.iid, "quantity_skew": 0}, "--quantity-skew must be > 0"),
        ({"test_fraction": 1.5}, "--test-fraction must be between 0 and 1"),
        ({"test_per_category": 50}, "fewer than --test-per-category 50"),
        ({"test_per_category": -1}, "--test-per-category -1 holds out no test records"),
    ],
)
def test_bad_settings_are_refused_with_the_flag_named(
    dolly_file: Callable[..., Path], tmp_path: Path, settings: dict[str, Any], expected: str
) -> None:
    out = tmp_path / "out"
    with pytest.raises(CoveyError, match=expected.replace("-", r"\-").replace(".", r"\.")):
        run_split(SplitConfig(input=str(dolly_file(per_category=20)), out=out, **settings))
    assert not out.exists()


def test_test_fraction_and_test_from(dolly_file: Callable[..., Path], tmp_path: Path) -> None:
    source = dolly_file(per_category=40)
    manifest, _, test = split(source, tmp_path / "f", test_fraction=0.25, min_size=10)
    assert manifest["test"]["by_category"] == dict.fromkeys(CATEGORIES, 10) and len(test) == 80
    held_out = dolly_file(per_category=2, name="held_out.jsonl")
    manifest, clients, test = split(source, tmp_path / "t", test_from=str(held_out), min_size=10)
    assert len(test) == 16 and manifest["train_records"] == 320 == sum(map(len, clients))
    assert manifest["test_source"]["input"] == str(held_out)
