"""A participant's private split: the validation examples it judges with are never trained on."""

from __future__ import annotations

import pytest

from covey.data.prompts import Example
from covey.errors import DataError
from covey.flock.agent import data_split


def examples(n: int) -> list[Example]:
    return [Example(input_ids=[i], labels=[i]) for i in range(n)]


@pytest.mark.parametrize("n", range(2, 21))
@pytest.mark.parametrize("keep", [1, 2, 3, 16])
def test_validation_is_held_out_of_training(n: int, keep: int) -> None:
    """Every example lands on exactly one side; a voter always has one validation example and
    at most a quarter of the examples when there are 4 or more (with 2 or 3: exactly one).
    With fewer than 4 examples example 0 used to be on both sides."""
    given = examples(n)
    train, validation = data_split(given, keep)
    held = {e.input_ids[0] for e in validation}
    trained = {e.input_ids[0] for e in train}
    assert not held & trained, f"{sorted(held & trained)} both trained on and held out"
    assert held | trained == set(range(n)) and len(train) + len(validation) == n
    assert 1 <= len(validation) == max(1, min(keep, n // 4))
    assert train, "nothing left to train on"


@pytest.mark.parametrize("n", [0, 1])
def test_fewer_than_two_examples_are_refused(n: int) -> None:
    """One example cannot be both trained on and held out: a clear error, not a voter that
    judges on its own training data."""
    with pytest.raises(DataError, match="at least 2 examples"):
        data_split(examples(n), 4)
