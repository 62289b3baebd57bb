"""Client selection reproduces Shepherd's schedule exactly."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from covey.errors import ConfigError
from covey.fed.selection import select_clients


@pytest.fixture(autouse=True)
def _keep_global_numpy_state() -> Iterator[None]:
    """The Shepherd re-enactment seeds numpy's global generator; restore it afterwards."""
    saved = np.random.get_state()
    yield
    np.random.set_state(saved)


def shepherd(num_clients: int, client_selection_frac: float, epoch: int) -> set[int]:
    """Shepherd's three lines (FedIT fed_utils/client_participation_scheduling.py)."""
    np.random.seed(epoch)
    num_selected = max(int(client_selection_frac * num_clients), 1)
    return set(np.random.choice(np.arange(num_clients), num_selected, replace=False))


@pytest.mark.parametrize(
    ("num_clients", "fraction"), [(100, 0.1), (10, 0.3), (10, 0.5), (20, 0.05), (7, 0.29)]
)
def test_matches_shepherd(num_clients: int, fraction: float) -> None:
    for round_index in range(6):
        got = select_clients(num_clients, fraction, round_index)
        assert got == sorted(shepherd(num_clients, fraction, round_index))
        assert all(type(i) is int for i in got)


def test_selection_seed_shifts_the_schedule() -> None:
    for round_index in range(4):
        got = select_clients(50, 0.2, round_index, selection_seed=11)
        assert got == sorted(shepherd(50, 0.2, round_index + 11))
    assert select_clients(50, 0.2, 0, selection_seed=1) != select_clients(50, 0.2, 0)


def test_sorted_unique_in_range() -> None:
    got = select_clients(1000, 0.05, 3)
    assert got == sorted(set(got))
    assert len(got) == 50
    assert all(0 <= i < 1000 for i in got)


def test_reproducible_and_leaves_global_numpy_alone() -> None:
    np.random.seed(123)
    expected_next = np.random.rand()
    np.random.seed(123)
    first = select_clients(30, 0.3, 5)
    assert np.random.rand() == expected_next
    assert select_clients(30, 0.3, 5) == first


def test_full_fraction_selects_everyone() -> None:
    for round_index in range(3):
        assert select_clients(8, 1.0, round_index) == list(range(8))


def test_tiny_fraction_selects_one() -> None:
    got = select_clients(10, 0.01, 0)
    assert len(got) == 1 and got == sorted(shepherd(10, 0.01, 0))


@pytest.mark.parametrize("fraction", [0.0, -0.5, 1.01, 2.0, float("nan"), float("inf")])
def test_bad_fraction_is_a_config_error(fraction: float) -> None:
    with pytest.raises(ConfigError, match=r"fed\.client_fraction"):
        select_clients(10, fraction, 0)


def test_seed_out_of_range_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"fed\.selection_seed"):
        select_clients(10, 0.5, 0, selection_seed=-1)


def test_no_clients_raises() -> None:
    with pytest.raises(ValueError):
        select_clients(0, 0.5, 0)
