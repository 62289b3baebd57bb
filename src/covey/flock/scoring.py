"""How a FLock voter judges proposals: on its own private validation examples, and against
the round's other proposals.

A voter measures each example's loss under the round's global adapter and under each proposal,
then rejects a proposal that makes its examples significantly worse (`judge`, a paired test).
That alone passes whatever does not hurt the voter's few examples: an update negated at strength
1 costs a voter little, a poisoned or scaled one may even help it. So the voter also compares
the round's proposals with each other (`round_outliers`, on when `flock.round_relative` is set):
the size of each update against the round's median, its direction against the mean of the
others, and the loss change it causes against the others' changes. The verdicts, one per
proposer in draw order, become the bits of its ballot.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from covey.data.prompts import Example
from covey.model.lora import load_adapter_state
from covey.state import State, delta, flatten
from covey.train.evaluate import example_losses


@dataclass(frozen=True)
class Judgement:
    """A voter's view of one proposal: loss changes on its own validation examples."""

    gain: float
    """Mean loss decrease per example (positive: the proposal helps)."""
    harm_z: float
    """The mean loss increase in standard errors of the paired per-example differences."""
    accept: bool
    stderr: float = 0.0
    """Standard error of the mean loss change: how precisely this voter measured `gain`."""
    round_view: RoundView | None = None
    """The proposal against the round's others, when the round-relative rule ran."""

    @property
    def reason(self) -> str:
        """Why the proposal was rejected ("" when accepted)."""
        if not self.accept and self.round_view is not None and self.round_view.reason:
            return self.round_view.reason
        return "" if self.accept else "harms the voter's examples"


@dataclass(frozen=True)
class RoundRule:
    """Thresholds of the round-relative checks (`flock.round_*` settings)."""

    max_norm_ratio: float = 3.0
    """Reject an update more than this many times the round's median size, or less than its
    inverse (a scaled update; a token one)."""
    min_cosine: float = 0.0
    """Reject an update whose cosine with more than half of the round's other updates is below
    this (pointing away from what most others learned)."""
    max_relative_z: float = 3.0
    """Reject an update whose gain on the voter's examples falls below the round's median gain
    by more than this many spreads (the larger of the gains' robust spread and the voter's
    measurement error of that gain)."""
    min_proposals: int = 3
    """Fewer valid proposals than this: no round to compare with, only `judge` decides."""
    trust_gain_z: float = 2.0
    """Do not reject for its direction a proposal whose gain on the voter's own examples is at
    least this many standard errors above zero (a huge value: never). When attackers hold most
    of a round's proposals, the others' mean points their way and the honest update is the one that
    disagrees; the voter's own paired measurement is the evidence the attackers cannot move."""


@dataclass(frozen=True)
class RoundView:
    """One proposal against the round's other valid proposals."""

    norm_ratio: float
    """Its update's L2 size over the round's median size."""
    cosine: float
    """Cosine between its update and the mean of the others' updates."""
    opposed: float
    """Share of the other updates it points away from (pairwise cosine below the rule's
    `min_cosine`): the direction check."""
    relative_z: float
    """How far its gain falls below the round's median gain, in spreads (positive: worse)."""
    reason: str
    """The first check it fails ("" when it passes them all)."""


def judge(before: torch.Tensor, after: torch.Tensor, harm_z: float) -> Judgement:
    """Accept unless the proposal makes these examples significantly worse.

    A paired test over the voter's examples: with d the per-example loss increase, reject when
    mean(d) >= harm_z * stderr(d). An honest update trained on other data moves a voter's loss
    by a little either way, most of all late in training when the gains are small, and requiring
    a strict improvement would slash honest proposers for that noise; an attacked update raises
    the loss on nearly every example and is rejected at any sensible harm_z. harm_z = 0 is the
    strict rule: accept only a lower mean loss. Examples without target tokens are skipped.
    """
    keep = ~(before.isnan() | after.isnan())
    diff = (after - before)[keep].double()
    if diff.numel() == 0:
        return Judgement(gain=0.0, harm_z=0.0, accept=False)
    mean = float(diff.mean())
    stderr = float(diff.std(unbiased=True)) / math.sqrt(diff.numel()) if diff.numel() > 1 else 0.0
    z = mean / stderr if stderr > 0 else 0.0  # one example, or all equal: no spread to test
    accept = mean < 0 if harm_z == 0 or stderr == 0 else mean < harm_z * stderr
    return Judgement(gain=-mean, harm_z=z, accept=accept, stderr=stderr)


def round_outliers(
    deltas: Sequence[torch.Tensor | None],
    judgements: Sequence[Judgement | None],
    rule: RoundRule,
) -> list[RoundView | None]:
    """Each valid proposal (a flattened update `delta` from the round's global adapter and the
    voter's `judge` of it) against the round's other valid proposals; None where invalid.

    Three checks, each robust to a minority of attackers because it compares with a median or
    with a majority of the others: size (`norm_ratio` outside [1/max, max]: a scaled update, as
    in model replacement, or a token one), direction (a cosine below `min_cosine` with more than
    half of the other updates, pairwise: a negated update), and usefulness on the voter's data
    relative to the round (`relative_z` above `max_relative_z`). The direction check yields to
    the voter's own evidence: a proposal that significantly lowers the voter's loss
    (`trust_gain_z`) is not rejected for disagreeing with the others, who may be the attackers.
    Size is not overridden, since a boosted poisoned update can help a voter's examples. An
    honest round on non-IID data has spread in all three; the thresholds leave room for it (the
    false-positive rate is measured in benchmarks/bench_robustness.py). With fewer than
    `rule.min_proposals` valid proposals there is no round to compare with, and every view is
    None.

    Why pairwise and not against the others' mean (`cosine`, still reported): honest LoRA
    updates from non-IID clients are nearly orthogonal (SmolLM2, r=16: pairwise cosines ~0.05
    to 0.1 after the first round). A negated update among them pulls the others' mean towards
    minus an honest update, so every honest update's cosine with the others' mean falls to ~0,
    either side: against the mean with threshold 0, honest voters rejected 8 of 16 honest votes
    in sign-flip rounds, while the negated update sat at -0.06 to -0.13. Pairwise, an honest
    update agrees with the other honest ones and opposes only the negated one (a minority), and
    the negated update opposes every honest one.
    """
    valid = [
        i
        for i, (d, j) in enumerate(zip(deltas, judgements, strict=True))
        if d is not None and j is not None
    ]
    views: list[RoundView | None] = [None] * len(deltas)
    if len(valid) < rule.min_proposals:
        return views
    vectors = torch.stack([deltas[i].double() for i in valid])  # type: ignore[union-attr]
    norms = vectors.norm(dim=1)
    units = vectors / norms.clamp(min=1e-30).unsqueeze(1)
    pairwise = units @ units.T  # cosines, row against column
    median_norm = float(norms.median())
    total = vectors.sum(dim=0)
    gains = torch.tensor([judgements[i].gain for i in valid], dtype=torch.float64)  # type: ignore[union-attr]
    median_gain = float(gains.median())
    spread = 1.4826 * float((gains - median_gain).abs().median())  # MAD, as a std under noise
    for row, i in enumerate(valid):
        judgement = judgements[i]
        assert judgement is not None
        ratio = float(norms[row]) / median_norm if median_norm > 0 else 1.0
        others = (total - vectors[row]) / (len(valid) - 1)
        scale = float(norms[row]) * float(others.norm())
        cosine = float(vectors[row] @ others) / scale if scale > 0 else 0.0
        against = (pairwise[row] < rule.min_cosine).double()
        against[row] = 0.0
        opposed = float(against.sum()) / (len(valid) - 1)
        noise = max(spread, judgement.stderr)
        relative_z = (median_gain - judgement.gain) / noise if noise > 0 else 0.0
        helps = judgement.stderr > 0 and -judgement.harm_z >= rule.trust_gain_z  # judge's z
        reason = ""
        if not 1 / rule.max_norm_ratio <= ratio <= rule.max_norm_ratio:
            reason = f"size {ratio:.2f}x the round's median"
        elif opposed > 0.5 and not helps:
            reason = f"direction: away from {opposed:.0%} of the others (mean cosine {cosine:.2f})"
        elif relative_z > rule.max_relative_z:
            reason = f"gain {relative_z:.1f} spreads below the round's median"
        views[i] = RoundView(ratio, cosine, opposed, relative_z, reason)
    return views


def flat_delta(state: State, global_state: State) -> torch.Tensor:
    """An update as one float32 vector: its difference from the global adapter, keys in order."""
    return flatten(delta(state, global_state))


def judge_proposals(
    model: Any,
    validation: Sequence[Example],
    global_state: State,
    candidates: Sequence[State | None],
    harm_z: float,
    batch_size: int,
    pad_id: int,
    round_rule: RoundRule | None = None,
) -> list[Judgement | None]:
    """`judge` every candidate against `global_state` on `validation` (None stays None: a
    proposal that could not be fetched or failed validation, which the ballot rejects); with a
    `round_rule`, also reject the round's outliers (`round_outliers`)."""
    load_adapter_state(model, global_state)
    before = example_losses(model, validation, batch_size, pad_id)
    judged: list[Judgement | None] = []
    for state in candidates:
        if state is None:
            judged.append(None)
            continue
        load_adapter_state(model, state)
        after = example_losses(model, validation, batch_size, pad_id)
        judged.append(judge(before, after, harm_z))
    if round_rule is None:
        return judged
    deltas = [None if s is None else flat_delta(s, global_state) for s in candidates]
    views = round_outliers(deltas, judged, round_rule)
    return [
        None if j is None else replace(j, round_view=v, accept=j.accept and not (v and v.reason))
        for j, v in zip(judged, views, strict=True)
    ]
