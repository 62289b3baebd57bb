"""A voter's round-relative rule on hand-made proposal sets: size, direction and gain against
the round's other proposals (covey.flock.scoring.round_outliers)."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from covey.config import load_recipe
from covey.errors import ConfigError
from covey.flock.scoring import Judgement, RoundRule, flat_delta, round_outliers

RULE = RoundRule(max_norm_ratio=3.0, min_cosine=0.0, max_relative_z=3.0)


def _judged(gain: float, stderr: float = 0.01) -> Judgement:
    return Judgement(gain=gain, harm_z=-gain / stderr, accept=True, stderr=stderr)


def _honest_round() -> list[torch.Tensor]:
    """Four honest updates: one shared direction plus each client's own part, sizes 0.8-1.3."""
    torch.manual_seed(0)
    shared = torch.randn(64)
    return [(shared + 0.8 * torch.randn(64)) * s for s in (0.8, 1.0, 1.1, 1.3)]


def test_hand_computed_ratio_cosine_and_relative_gain() -> None:
    deltas = [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0]), torch.tensor([3.0, 0.0])]
    gains = [_judged(0.10), _judged(0.04), _judged(0.07)]
    views = round_outliers(deltas, gains, RULE)
    # norms 1, 2, 3: median 2
    assert [v.norm_ratio for v in views if v] == pytest.approx([0.5, 1.0, 1.5])
    # proposal 0 against the others' mean (1.5, 1): cosine 1.5 / sqrt(3.25)
    assert views[0] and views[0].cosine == pytest.approx(1.5 / math.sqrt(3.25))
    # proposal 1 against (2, 0): orthogonal
    assert views[1] and views[1].cosine == pytest.approx(0.0)
    # pairwise cosines 0-1: 0, 0-2: 1, 1-2: 0: none below 0, so none opposes the others
    assert [v.opposed for v in views if v] == [0.0, 0.0, 0.0]
    # gains 0.10, 0.04, 0.07: median 0.07, MAD 0.03 -> spread 1.4826 * 0.03
    spread = 1.4826 * 0.03
    assert views[1].relative_z == pytest.approx((0.07 - 0.04) / spread)
    assert views[0].relative_z == pytest.approx((0.07 - 0.10) / spread)
    assert all(v and not v.reason for v in views)


def test_an_honest_non_iid_round_passes() -> None:
    gains = [_judged(g) for g in (0.05, 0.03, 0.06, 0.02)]
    views = round_outliers(_honest_round(), gains, RULE)
    assert all(v is not None and v.reason == "" for v in views), views


def test_a_negated_update_is_rejected_for_its_direction() -> None:
    deltas = _honest_round()
    deltas[2] = -deltas[2]  # sign flip at strength 1: same size, opposite direction
    gains = [_judged(g) for g in (0.05, 0.03, 0.01, 0.02)]  # it barely hurts this voter
    views = round_outliers(deltas, gains, RULE)
    assert views[2] and views[2].reason.startswith("direction")
    assert [bool(v and v.reason) for v in views] == [False, False, True, False]


def test_nearly_orthogonal_honest_updates_keep_their_place_beside_a_negated_one() -> None:
    """As LoRA updates of non-IID clients on SmolLM2 (pairwise cosines ~0.08), 3 proposers, one
    of them negating. Each honest update's cosine with the others' mean is ~0 either side (the
    mean holds minus an honest update): the earlier rule, that cosine against 0, rejected both
    honest updates here. Pairwise, each honest update opposes only the negated one."""
    torch.manual_seed(1)
    shared = torch.randn(4096)
    honest = [0.3 * shared + torch.randn(4096) for _ in range(3)]
    deltas = [honest[0], honest[1], -honest[2]]
    gains = [_judged(g, stderr=0.02) for g in (0.01, 0.0, 0.0)]  # no clear evidence either way
    views = round_outliers(deltas, gains, RULE)
    assert all(v is not None for v in views)
    assert [v.cosine < 0 for v in views if v] == [True, True, True]  # the mean rule's figure
    assert [v.opposed for v in views if v] == [0.5, 0.5, 1.0]
    assert [bool(v and v.reason) for v in views] == [False, False, True]
    assert views[2] and views[2].reason.startswith("direction")


def test_an_honest_update_outvoted_by_negated_ones_is_kept_on_the_voters_evidence() -> None:
    # 2 of 3 proposals are negated honest updates: the others' mean points their way, so the
    # honest update is the one with a negative cosine. The voter's own examples say otherwise.
    honest = _honest_round()
    deltas = [honest[0], -honest[1], -honest[2]]
    gains = [_judged(0.05), _judged(-0.01), _judged(-0.02)]  # honest: 5 stderrs of help
    views = round_outliers(deltas, gains, RULE)
    assert views[0] and views[0].cosine < 0 and views[0].reason == "", views[0]
    # (the negated ones, each against one honest and one negated update, are no outliers
    # either: with attackers in the majority only the voters' paired harm test rejects them)
    # without the override (trust_gain_z = inf), the honest update is rejected for direction
    strict = round_outliers(deltas, gains, replace(RULE, trust_gain_z=math.inf))
    assert strict[0] and strict[0].reason.startswith("direction")
    # help under the bar (1 stderr) earns no override: then the direction check decides
    weak = [_judged(0.01), *gains[1:]]
    assert round_outliers(deltas, weak, RULE)[0].reason.startswith("direction")  # type: ignore[union-attr]


@pytest.mark.parametrize("scale", [4.0, 0.1])
def test_a_scaled_or_token_update_is_rejected_for_its_size(scale: float) -> None:
    deltas = _honest_round()
    deltas[0] = deltas[1] * scale  # model replacement boosts; a free rider sends next to nothing
    gains = [_judged(g) for g in (0.08, 0.03, 0.06, 0.02)]  # a boosted update may help a voter
    views = round_outliers(deltas, gains, RULE)
    assert views[0] and views[0].reason.startswith("size")
    assert not 1 / 3 <= views[0].norm_ratio <= 3
    assert not any(v and v.reason for v in views[1:])


def test_a_gain_far_below_the_round_is_rejected_only_when_measured_precisely() -> None:
    deltas = _honest_round()
    gains = [_judged(0.05), _judged(0.04), _judged(0.06), _judged(-0.05, stderr=0.01)]
    views = round_outliers(deltas, gains, RULE)
    assert views[3] and views[3].reason.startswith("gain")
    noisy = [*gains[:3], _judged(-0.05, stderr=0.2)]  # the voter cannot tell it apart
    assert not round_outliers(deltas, noisy, RULE)[3].reason  # type: ignore[union-attr]


def test_too_few_valid_proposals_leave_it_to_the_paired_test() -> None:
    deltas: list[torch.Tensor | None] = [torch.ones(4), None, -torch.ones(4)]
    gains: list[Judgement | None] = [_judged(0.1), None, _judged(0.1)]
    assert round_outliers(deltas, gains, RULE) == [None, None, None]
    # invalid proposals stay None and do not count towards the round
    deltas = [*_honest_round()[:3], None]
    gains = [_judged(0.05), _judged(0.04), _judged(0.06), None]
    views = round_outliers(deltas, gains, RULE)
    assert views[3] is None and all(v is not None for v in views[:3])


def test_flat_delta_is_the_difference_in_key_order() -> None:
    global_state = {"b": torch.zeros(2), "a": torch.ones(1, 2)}
    state = {"a": torch.tensor([[2.0, 3.0]]), "b": torch.tensor([-1.0, 0.5])}
    assert flat_delta(state, global_state).tolist() == [1.0, 2.0, -1.0, 0.5]


@pytest.mark.parametrize(
    "setting",
    [
        "flock.round_max_norm_ratio=1",
        "flock.round_min_cosine=2",
        "flock.round_max_relative_z=-1",
        "flock.round_trust_gain_z=-1",
    ],
)
def test_bad_thresholds_are_refused_at_load(setting: str) -> None:
    with pytest.raises(ConfigError, match=setting.split("=")[0].split(".")[1]):
        load_recipe(None, [setting])
