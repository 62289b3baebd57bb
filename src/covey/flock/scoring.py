"""How a FLock voter judges proposals: on its own private validation examples.

A voter measures each example's loss under the round's global adapter and under each proposal,
then accepts a proposal unless it makes its examples significantly worse (`judge`, a paired
test). The verdicts, one per proposer in draw order, become the bits of its ballot.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from covey.data.prompts import Example
from covey.model.lora import load_adapter_state
from covey.state import State
from covey.train.evaluate import example_losses


@dataclass(frozen=True)
class Judgement:
    """A voter's view of one proposal: loss changes on its own validation examples."""

    gain: float
    """Mean loss decrease per example (positive: the proposal helps)."""
    harm_z: float
    """The mean loss increase in standard errors of the paired per-example differences."""
    accept: bool


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
    return Judgement(gain=-mean, harm_z=z, accept=accept)


def judge_proposals(
    model: Any,
    validation: Sequence[Example],
    global_state: State,
    candidates: Sequence[State | None],
    harm_z: float,
    batch_size: int,
    pad_id: int,
) -> list[Judgement | None]:
    """`judge` every candidate against `global_state` on `validation` (None stays None: a
    proposal that could not be fetched or failed validation, which the ballot rejects)."""
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
    return judged
