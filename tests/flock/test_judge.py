"""A voter's verdict on one proposal: accept unless its validation loss gets significantly worse."""

from __future__ import annotations

import torch

from covey.flock.scoring import judge

BEFORE = torch.full((16,), 2.0, dtype=torch.float64)


def test_an_update_that_hurts_every_example_is_rejected() -> None:
    verdict = judge(BEFORE, BEFORE + torch.linspace(0.2, 0.6, 16), harm_z=2.0)
    assert not verdict.accept and verdict.gain < 0 and verdict.harm_z > 2


def test_noise_around_zero_is_accepted_but_not_under_the_strict_rule() -> None:
    # a slightly worse mean (+0.002) that is well inside the spread of the differences
    noise = torch.tensor([0.05, -0.04, 0.03, -0.05, 0.02, -0.01, 0.04, -0.03] * 2).double()
    after = BEFORE + noise + 0.002 - noise.mean()
    assert judge(BEFORE, after, harm_z=2.0).accept
    assert not judge(BEFORE, after, harm_z=0.0).accept  # strict: only a lower mean
    assert judge(BEFORE, BEFORE - 0.01 + noise - noise.mean(), harm_z=0.0).accept


def test_a_copy_of_the_global_adapter_is_not_accepted() -> None:
    verdict = judge(BEFORE, BEFORE.clone(), harm_z=2.0)  # a free rider: no change at all
    assert not verdict.accept and verdict.gain == 0


def test_examples_without_targets_are_skipped() -> None:
    before = torch.tensor([2.0, float("nan"), 2.0, 2.0], dtype=torch.float64)
    after = torch.tensor([1.9, 0.1, 1.8, 1.95], dtype=torch.float64)
    verdict = judge(before, after, harm_z=2.0)
    assert verdict.accept and abs(verdict.gain - (0.1 + 0.2 + 0.05) / 3) < 1e-9
    assert not judge(torch.tensor([float("nan")]), torch.tensor([1.0]), harm_z=2.0).accept
