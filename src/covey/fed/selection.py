"""Which clients train in a round: Shepherd's uniform sampling without replacement.

Shepherd (FedIT, `fed_utils/client_participation_scheduling.py`) seeds numpy's global generator
with the round index, draws `max(int(fraction * num_clients), 1)` distinct ids, and keeps them as
a set. We replay the same legacy MT19937 stream from a private `np.random.RandomState`, so the
choice is identical for `selection_seed=0` but no global random state is touched.
"""

from __future__ import annotations

import math

import numpy as np

from covey.errors import ConfigError

_MAX_SEED = 2**32 - 1  # legacy RandomState seeds are 32-bit


def num_selected(num_clients: int, fraction: float) -> int:
    """How many clients a round uses; the same float expression as Shepherd, so the same count."""
    return max(int(fraction * num_clients), 1)


def select_clients(
    num_clients: int, fraction: float, round_index: int, selection_seed: int = 0
) -> list[int]:
    """The client ids (ascending) selected for `round_index` (0-based, as in Shepherd).

    `selection_seed + round_index` seeds the draw, so `selection_seed=0` reproduces Shepherd's
    `np.random.seed(round)` choice and a different seed gives a different but reproducible schedule.
    """
    if isinstance(fraction, bool) or not (math.isfinite(fraction) and 0.0 < fraction <= 1.0):
        raise ConfigError(
            f"fed.client_fraction must be in (0, 1], got {fraction!r}; "
            "e.g. --set fed.client_fraction=0.1 selects a tenth of the clients each round"
        )
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    if round_index < 0:
        raise ValueError(f"round_index must be >= 0, got {round_index}")
    seed = selection_seed + round_index
    if not 0 <= seed <= _MAX_SEED:
        raise ConfigError(
            f"fed.selection_seed must be in [0, {_MAX_SEED - round_index}] "
            f"for round {round_index}, got {selection_seed}"
        )
    rng = np.random.RandomState(seed)
    chosen = rng.choice(np.arange(num_clients), num_selected(num_clients, fraction), replace=False)
    return sorted({int(i) for i in chosen})
