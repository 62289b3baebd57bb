"""Covey's allocation picks the same rows as Shepherd's `client_data_allocation.py`.

The reference below re-enacts Shepherd's steps with pandas and the global numpy / Python random
states, as Shepherd runs them; the one change is a stable sort (see covey.data.partition for
why). Records are identified by the `id` column, which Covey also writes.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from covey.data.partition import Scheme
from covey.data.split import SplitConfig, allocate
from tests.conftest import dolly_records, write_records

pd = pytest.importorskip("pandas")

SEED = 42
ALPHA, MIN_SIZE = 0.5, 40


def shepherd_allocation(records: list[dict], n_clients: int, diff_quantity: bool) -> tuple:
    np.random.seed(SEED)
    random.seed(SEED)
    frame = pd.DataFrame(records)
    frame["id"] = range(len(frame))
    ordered = frame.sort_values(by=["category"], kind="stable")
    test_parts = [group.sample(n=10) for _, group in ordered.groupby("category")]
    test = pd.concat(test_parts)
    remaining = ordered.drop(index=test.index).reset_index(drop=True)

    if diff_quantity:
        n_rows = len(remaining)
        min_size = 0
        while min_size < MIN_SIZE:
            parts: list[list[int]] = [[] for _ in range(n_clients)]
            for category in remaining["category"].unique().tolist():
                rows = remaining.index[remaining["category"] == category].to_numpy().copy()
                np.random.shuffle(rows)
                shares = np.random.dirichlet(np.repeat(ALPHA, n_clients))
                shares = np.array(
                    [s * (len(p) < n_rows / n_clients) for s, p in zip(shares, parts, strict=True)]
                )
                shares = shares / shares.sum()
                cuts = (np.cumsum(shares) * len(rows)).astype(int)[:-1]
                parts = [
                    p + chunk.tolist() for p, chunk in zip(parts, np.split(rows, cuts), strict=True)
                ]
                min_size = min(len(p) for p in parts)
    else:
        shards = np.array_split(remaining.index.to_numpy(), 2 * n_clients)
        random.shuffle(shards)
        parts = [np.concatenate(shards[2 * i : 2 * i + 2]).tolist() for i in range(n_clients)]

    clients = [remaining.loc[p, "id"].tolist() for p in parts]
    return test["id"].tolist(), clients


@pytest.mark.parametrize("scheme", [Scheme.dirichlet, Scheme.shards])
def test_same_rows_as_shepherd(tmp_path: Path, scheme: Scheme) -> None:
    records = dolly_records(per_category=70)
    random.Random(3).shuffle(records)  # categories interleaved, as in the real file
    source = write_records(tmp_path / "dolly.jsonl", records)

    expected_test, expected_clients = shepherd_allocation(records, 6, scheme is Scheme.dirichlet)
    allocation = allocate(
        SplitConfig(input=str(source), clients=6, scheme=scheme, min_size=MIN_SIZE)
    )

    assert [r.id for r in allocation.test] == expected_test
    assert [[r.id for r in rows] for rows in allocation.clients] == expected_clients
