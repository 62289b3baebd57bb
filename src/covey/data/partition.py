"""Partition schemes: which training rows each client holds.

Pure functions on row positions. Every function takes `categories`, the category of each
training row with rows already sorted by category (as Shepherd sorts its data frame), and
returns one list of row positions per client. Each row goes to exactly one client.

Shepherd compatibility (FedIT, `client_data_allocation.py`): with the same seed, `split_test`,
`partition_dirichlet` and `partition_shards` make the same random calls in the same order as
Shepherd does, so they choose the same rows. One deviation: Shepherd sorts with pandas' default
quicksort, which is not stable, so the order of rows *within* a category depends on numpy's
sort internals; Covey sorts stably (file order within a category). The test
`tests/data/test_shepherd_parity.py` replays Shepherd's pandas steps with a stable sort and
checks that both pick identical rows.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from enum import Enum

import numpy as np

from covey.errors import ConfigError, DataError

MAX_DIRICHLET_ATTEMPTS = 1000
"""Shepherd redraws until every client is large enough, forever if it never is; we stop here."""


class Scheme(str, Enum):
    """How training rows are divided among clients."""

    shards = "shards"
    """Shepherd's `diff_quantity=0`: category-sorted rows cut into 2N shards, two per client."""
    dirichlet = "dirichlet"
    """Shepherd's `diff_quantity=1`: per-category Dirichlet(alpha) proportions."""
    iid = "iid"
    """Uniformly at random (equal sizes, or Dirichlet sizes with a quantity skew)."""
    categories = "categories"
    """Each client holds K categories; a category held by several clients is split among them."""


def group_by_category(categories: Sequence[str]) -> dict[str, list[int]]:
    """Row positions per category, categories in sorted order, rows in their given order."""
    groups: dict[str, list[int]] = {}
    for position, category in enumerate(categories):
        groups.setdefault(category, []).append(position)
    return {c: groups[c] for c in sorted(groups)}


def split_test(
    categories: Sequence[str],
    rs: np.random.RandomState,
    per_category: int | None = None,
    fraction: float | None = None,
) -> tuple[list[int], list[int]]:
    """Hold out a global test set; return `(test_positions, train_positions)`.

    With `per_category=K`, K rows are drawn without replacement from each category, in sorted
    category order (Shepherd: `groupby('category').apply(lambda x: x.sample(n=10))`, which
    calls `RandomState.choice(len(group), K, replace=False)` on the global numpy state).
    With `fraction=F`, each category gives `round(F * size)` rows, drawn the same way.
    Test rows come out grouped by category; train rows keep their sorted order.
    """
    if (per_category is None) == (fraction is None):
        raise ConfigError("give exactly one of --test-per-category and --test-fraction")
    test: list[int] = []
    for category, rows in group_by_category(categories).items():
        if per_category is not None:
            k = per_category
            if len(rows) < k:
                raise DataError(
                    f"category {category!r} has {len(rows)} record(s), fewer than "
                    f"--test-per-category {k}; lower it or use --test-fraction"
                )
        else:
            assert fraction is not None
            k = round(fraction * len(rows))
        test += [rows[i] for i in rs.choice(len(rows), size=k, replace=False)]
    held_out = set(test)
    return test, [p for p in range(len(categories)) if p not in held_out]


def partition_shards(
    n_rows: int, n_clients: int, rng: random.Random, shards_per_client: int = 2
) -> list[list[int]]:
    """Cut the (category-sorted) rows into `shards_per_client * n_clients` contiguous shards of
    near-equal size, shuffle the shards with Python's `random`, and deal them out in order.

    Contiguous shards of sorted rows hold one or two categories each, so clients see few
    categories (strong label skew) while their sizes stay equal (McMahan et al., 2017).
    """
    n_shards = shards_per_client * n_clients
    if n_rows < n_shards:
        raise DataError(
            f"{n_rows} training records cannot fill {n_shards} shards "
            f"({shards_per_client} per client); use fewer --clients"
        )
    shards = np.array_split(np.arange(n_rows), n_shards)
    rng.shuffle(shards)
    return [
        np.concatenate(shards[i * shards_per_client : (i + 1) * shards_per_client]).tolist()
        for i in range(n_clients)
    ]


def partition_dirichlet(
    categories: Sequence[str],
    n_clients: int,
    alpha: float,
    min_size: int,
    rs: np.random.RandomState,
    max_attempts: int = MAX_DIRICHLET_ATTEMPTS,
) -> list[list[int]]:
    """Per category, give clients shares drawn from Dirichlet(alpha); a client that already
    holds `n_rows / n_clients` rows gets no more. Redraw until every client has `min_size`.

    Smaller alpha means stronger skew in both category mix and size (Hsu et al., 2019, as used
    by FedIT). Raises `DataError` when `max_attempts` draws never satisfy `min_size`.
    """
    if alpha <= 0:
        raise ConfigError(f"--alpha must be > 0 (got {alpha}); 0.5 is Shepherd's default")
    n_rows = len(categories)
    _check_feasible(n_rows, n_clients, min_size)
    labels = np.asarray(categories)
    # categories in order of first appearance: sorted data makes that alphabetical, like
    # Shepherd's `remaining_df['category'].unique()`
    by_category = [np.flatnonzero(labels == c) for c in dict.fromkeys(categories)]
    fair_share = n_rows / n_clients
    smallest_seen = 0
    for _ in range(max_attempts):
        parts: list[list[int]] = [[] for _ in range(n_clients)]
        for category_rows in by_category:
            rows = category_rows.copy()
            rs.shuffle(rows)
            shares = rs.dirichlet(np.repeat(alpha, n_clients))
            shares = shares * np.array([len(part) < fair_share for part in parts])
            total = shares.sum()
            # Shepherd divides by zero here when every client is full; share equally instead
            shares = shares / total if total > 0 else np.full(n_clients, 1 / n_clients)
            cuts = (np.cumsum(shares) * len(rows)).astype(int)[:-1]
            for part, chunk in zip(parts, np.split(rows, cuts), strict=True):
                part += chunk.tolist()
        smallest = min(len(part) for part in parts)
        if smallest >= min_size:
            return parts
        smallest_seen = max(smallest_seen, smallest)
    raise DataError(
        f"dirichlet: after {max_attempts} draws no allocation gave every one of {n_clients} "
        f"clients at least --min-size {min_size} records (best smallest client: {smallest_seen} "
        f"of {n_rows} rows); lower --min-size, raise --alpha, or use fewer --clients"
    )


def partition_iid(
    n_rows: int,
    n_clients: int,
    rs: np.random.RandomState,
    quantity_skew: float | None = None,
    min_size: int = 1,
) -> list[list[int]]:
    """Deal a random permutation of the rows out in consecutive blocks.

    Blocks are of equal size (±1), or with `quantity_skew=beta` of sizes drawn from
    Dirichlet(beta) over clients on top of `min_size` each: the quantity-based label-balanced
    skew of Li et al., 2022 (NIID-Bench). Smaller beta, more unequal sizes.
    """
    _check_feasible(n_rows, n_clients, min_size)
    permutation = rs.permutation(n_rows)
    sizes = client_sizes(n_rows, n_clients, rs, quantity_skew, min_size)
    return [chunk.tolist() for chunk in np.split(permutation, np.cumsum(sizes)[:-1])]


def partition_categories(
    categories: Sequence[str],
    n_clients: int,
    per_client: int,
    rs: np.random.RandomState,
    quantity_skew: float | None = None,
) -> list[list[int]]:
    """Each client holds `per_client` distinct categories (the "#C=k" label skew of NIID-Bench).

    Categories are dealt round-robin from a random permutation, so every category is held by
    `N*K/C` clients (±1) and none is dropped; the rows of a category held by several clients are
    split among them equally, or in proportion to per-client Dirichlet(`quantity_skew`) weights.
    """
    groups = group_by_category(categories)
    names = list(groups)
    n_categories = len(names)
    if not 1 <= per_client <= n_categories:
        raise ConfigError(
            f"--categories-per-client {per_client}: the data has {n_categories} "
            f"categor{'y' if n_categories == 1 else 'ies'}; choose 1..{n_categories}"
        )
    if n_clients * per_client < n_categories:
        need = -(-n_categories // n_clients)
        raise ConfigError(
            f"{n_clients} clients x {per_client} categories each cannot cover all "
            f"{n_categories} categories, so rows would be dropped; use "
            f"--categories-per-client {need} or more clients"
        )
    order = rs.permutation(n_categories)
    holders: dict[str, list[int]] = {name: [] for name in names}
    for client in range(n_clients):
        for j in range(per_client):
            holders[names[order[(client * per_client + j) % n_categories]]].append(client)
    weights = (
        rs.dirichlet(np.repeat(quantity_skew, n_clients)) if quantity_skew is not None else None
    )
    parts: list[list[int]] = [[] for _ in range(n_clients)]
    for name, rows in groups.items():
        shuffled = np.array(rows)
        rs.shuffle(shuffled)
        clients = holders[name]
        if weights is None:
            chunks = np.array_split(shuffled, len(clients))
        else:
            shares = weights[clients] / weights[clients].sum()
            chunks = np.split(shuffled, (np.cumsum(shares) * len(rows)).astype(int)[:-1])
        for client, chunk in zip(clients, chunks, strict=True):
            parts[client] += chunk.tolist()
    return parts


def client_sizes(
    n_rows: int,
    n_clients: int,
    rs: np.random.RandomState,
    quantity_skew: float | None,
    min_size: int,
) -> list[int]:
    """Sizes summing to `n_rows`: equal (±1), or `min_size` plus Dirichlet shares of the rest."""
    if quantity_skew is None:
        return [n_rows // n_clients + (i < n_rows % n_clients) for i in range(n_clients)]
    if quantity_skew <= 0:
        raise ConfigError(
            f"--quantity-skew must be > 0 (got {quantity_skew}); smaller is more skewed"
        )
    spare = n_rows - n_clients * min_size
    raw = rs.dirichlet(np.repeat(quantity_skew, n_clients)) * spare
    sizes = np.floor(raw).astype(int)
    # hand the rows lost to flooring to the largest remainders, so sizes sum to n_rows exactly
    for i in np.argsort(sizes - raw, kind="stable")[: spare - sizes.sum()]:
        sizes[i] += 1
    return [min_size + int(s) for s in sizes]


def check_min_size(parts: Sequence[Sequence[int]], min_size: int, scheme: Scheme) -> None:
    """Raise when a client got fewer than `min_size` rows (schemes without their own guarantee)."""
    sizes = [len(p) for p in parts]
    small = [i for i, size in enumerate(sizes) if size < min_size]
    if small:
        raise DataError(
            f"{scheme.value}: client(s) {small[:10]} would get fewer than --min-size {min_size} "
            f"records (sizes {sorted(sizes)[:5]}...); lower --min-size, use fewer --clients, "
            "or use more data"
        )


def _check_feasible(n_rows: int, n_clients: int, min_size: int) -> None:
    if n_rows < n_clients * max(min_size, 1):
        raise DataError(
            f"{n_rows} training records cannot give {n_clients} clients at least "
            f"{max(min_size, 1)} each; use fewer --clients, a smaller --min-size, or more data"
        )
