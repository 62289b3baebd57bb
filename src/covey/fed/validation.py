"""Checks on a client's update before it may touch the global adapter.

An update comes from a peer we do not control (over the network, on chain), so every check
returns a `Verdict` with a reason instead of raising: one malformed or hostile update is dropped
from the round, never allowed to crash the server or poison the average with NaN, a wrong shape,
or a sample count inflated to dominate the weighting.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from covey.state import State


@dataclass(frozen=True)
class Verdict:
    """The outcome of `validate_update`."""

    accepted: bool
    reason: str
    """Empty when accepted; else a short human reason naming the offending key or field."""
    num_samples: int
    """The weight to aggregate with: the claim clamped to what the client holds (0 if rejected)."""
    update_norm: float
    """L2 norm of (update - reference) over all tensors; nan when the structure is unusable."""
    clamped: bool = False
    """True when the claimed sample count exceeded the client's and was lowered to it."""


def _reject(reason: str, update_norm: float = math.nan) -> Verdict:
    return Verdict(accepted=False, reason=reason, num_samples=0, update_norm=update_norm)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _structure_problem(update: object, reference: State) -> str:
    """Why `update` cannot be compared with `reference` tensor by tensor ("" when it can)."""
    if not isinstance(update, dict):
        return f"update is not a dict of tensors (got {type(update).__name__})"
    for key, value in update.items():
        if not isinstance(key, str):
            return f"update has a non-string key {key!r}"
        if not isinstance(value, torch.Tensor):
            return f"{key} is not a tensor (got {type(value).__name__})"
        if value.layout != torch.strided or value.is_meta:
            return f"{key} is not a dense tensor with data"
    missing = sorted(reference.keys() - update.keys())
    unexpected = sorted(update.keys() - reference.keys())
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{_plural(len(missing), 'missing key')} (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{_plural(len(unexpected), 'unexpected key')} (e.g. {unexpected[0]})")
        return " and ".join(parts)
    for key, ref in reference.items():
        got = update[key]
        if got.shape != ref.shape:
            return f"shape of {key} is {tuple(got.shape)}, expected {tuple(ref.shape)}"
    for key, ref in reference.items():
        got = update[key]
        if got.dtype != ref.dtype:
            return f"dtype of {key} is {got.dtype}, expected {ref.dtype}"
    return ""


def validate_update(
    update: object,
    reference: State,
    claimed_samples: object,
    held_samples: int,
    max_update_norm: float = 0.0,
) -> Verdict:
    """Accept or reject one client's returned adapter against the round's global `reference`.

    Checks, in order: a dict of str -> dense tensor; exactly the reference's keys; the same
    shapes; the same dtypes; only finite values; an int sample count >= 1 (bool is not a count);
    the L2 distance from `reference` <= `max_update_norm` when that is > 0. A claim above
    `held_samples` (what the server knows the client holds) is clamped, not rejected, and flagged
    with `clamped`. `held_samples` is the server's own number: a negative one raises ValueError.
    """
    if held_samples < 0:
        raise ValueError(f"held_samples must be >= 0, got {held_samples}")
    problem = _structure_problem(update, reference)
    if problem:
        return _reject(problem)
    assert isinstance(update, dict)  # for the type checker; _structure_problem ensured it
    try:
        for key, value in update.items():
            if not bool(torch.isfinite(value).all()):
                return _reject(f"non-finite values in {key}")
        squares = 0.0
        for key, ref in reference.items():
            diff = update[key].to(device=ref.device, dtype=torch.float64) - ref.to(torch.float64)
            squares += float(torch.linalg.vector_norm(diff)) ** 2
        norm = math.sqrt(squares)
    except Exception as e:  # a peer's tensor torch cannot read must not stop the round
        return _reject(f"unreadable tensor data ({type(e).__name__}: {e})")

    if (
        isinstance(claimed_samples, bool)
        or not isinstance(claimed_samples, numbers.Integral)
        or int(claimed_samples) < 1
    ):
        return _reject(f"sample count must be an int >= 1, got {claimed_samples!r}", norm)
    claimed = int(claimed_samples)
    if held_samples == 0:
        return _reject("client holds no samples", norm)
    if max_update_norm > 0 and not norm <= max_update_norm:
        reason = f"update norm {norm:.4g} exceeds fed.max_update_norm={max_update_norm}"
        return _reject(reason, norm)
    return Verdict(
        accepted=True,
        reason="",
        num_samples=min(claimed, held_samples),
        update_norm=norm,
        clamped=claimed > held_samples,
    )
