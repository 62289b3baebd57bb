"""Checks on a client's update before it may touch the global adapter.

An update comes from a peer we do not control (over the network, on chain), so every check
returns a `Verdict` with a reason instead of raising: one malformed or hostile update is dropped
from the round, never allowed to crash the server or poison the average with NaN, a wrong shape,
or a sample count inflated to dominate the weighting.

The size of an update is bounded by `fed.max_update_norm` when set. FLock has no server to pick
a bound for it, so there the default is `training_norm_bound`: the most the task's own training
recipe (AdamW, `train.lr`, `train.max_steps`) can move the adapter, which every party computes
alike from the task's settings and the round's global adapter.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from covey.config import TrainConfig, Transport
from covey.fed.transport import FLOAT_DTYPES
from covey.state import State, delta, norm

ADAM_BETAS = (0.9, 0.999)
"""torch.optim.AdamW's default betas, which `covey.train.local.train_local` trains with."""
ROUNDING_SLACK = 1.01
"""`training_norm_bound`'s only margin: float rounding of the training arithmetic itself."""
UNIT_ROUNDOFF = {
    name: 0.0 if dtype == torch.float32 else torch.finfo(dtype).eps / 2
    for name, dtype in FLOAT_DTYPES.items()
}
"""Relative rounding error of the float transports (a weight is sent rounded to this): none
for fp32, which is what training holds; 2^-11 for fp16, 2^-8 for bf16."""


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
    bound_name: str = "fed.max_update_norm",
) -> Verdict:
    """Accept or reject one client's returned adapter against the round's global `reference`.

    Checks, in order: a dict of str -> dense tensor; exactly the reference's keys; the same
    shapes; the same dtypes; only finite values; an int sample count >= 1 (bool is not a count);
    the L2 distance from `reference` <= `max_update_norm` when that is > 0 (`bound_name` says
    where the bound comes from, for the reason). A claim above
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
        distance = norm(delta(update, reference, torch.float64))
    except Exception as e:  # a peer's tensor torch cannot read must not stop the round
        return _reject(f"unreadable tensor data ({type(e).__name__}: {e})")

    if (
        isinstance(claimed_samples, bool)
        or not isinstance(claimed_samples, numbers.Integral)
        or int(claimed_samples) < 1
    ):
        return _reject(f"sample count must be an int >= 1, got {claimed_samples!r}", distance)
    claimed = int(claimed_samples)
    if held_samples == 0:
        return _reject("client holds no samples", distance)
    if max_update_norm > 0 and not distance <= max_update_norm:
        reason = (
            f"update norm {distance:.4g} exceeds the bound {max_update_norm:.4g} ({bound_name})"
        )
        return _reject(reason, distance)
    return Verdict(
        accepted=True,
        reason="",
        num_samples=min(claimed, held_samples),
        update_norm=distance,
        clamped=claimed > held_samples,
    )


def adam_step_bound(step: int, betas: tuple[float, float] = ADAM_BETAS) -> float:
    """The most one AdamW step can move one parameter, in units of that step's learning rate:
    |m_hat / (sqrt(v_hat) + eps)| at optimizer step `step` (1-based) of a fresh optimizer, for
    any gradients (clipped or not, with or without a FedProx term).

    With m = (1-b1) sum_i b1^(t-i) g_i and v = (1-b2) sum_i b2^(t-i) g_i^2, Cauchy-Schwarz gives
    |m| <= (1-b1) sqrt(sum_j (b1^2/b2)^j) sqrt(v / (1-b2)); with the bias corrections that is

        (1-b1)/(1-b1^t) * sqrt((1-b2^t)/(1-b2)) * sqrt((1-g^t)/(1-g)),   g = b1^2/b2,

    attained by gradients that grow by b2/b1 every step. It is 1.0 at step 1 (m_hat/sqrt(v_hat)
    is the sign of the first gradient), 1.04 at step 10, 2.2 at 100, and rises to 7.27 for
    (0.9, 0.999): the often quoted (1-b1)/sqrt(1-b2) = 3.16 is Adam's typical large step, not
    its largest one.
    """
    if step < 1:
        raise ValueError(f"optimizer steps count from 1, got {step}")
    b1, b2 = betas
    g = b1 * b1 / b2
    return (
        (1 - b1)
        / (1 - b1**step)
        * math.sqrt((1 - b2**step) / (1 - b2))
        * math.sqrt((1 - g**step) / (1 - g))
    )


def training_norm_bound(
    train: TrainConfig,
    reference: State,
    transport: Transport = "fp32",
    topk_fraction: float = 0.1,
) -> float:
    """The largest L2 distance from `reference` (the round's global adapter) that an honest
    update of `train`'s recipe can have, as it arrives over `transport`.

    Training (`covey.train.local`): AdamW from a fresh optimizer for at most train.max_steps
    steps at a learning rate of at most train.lr (warmup and decay only lower it), on float32
    adapter weights (PEFT keeps LoRA weights in float32 on a bf16 or fp16 base). Step t moves
    each of the adapter's N parameters by at most lr * adam_step_bound(t), so by triangle
    inequality over steps the update's norm is at most

        sqrt(N) * lr * sum_{t=1..max_steps} adam_step_bound(t)                       (Adam)
        + max_steps * lr * weight_decay * (||reference|| + Adam)           (decoupled decay)

    whatever the data, gradient clipping or FedProx term (they change the gradients, and Adam's
    step does not grow with the gradient). The transport then rounds what was trained: fp16 and
    bf16 round each weight (add their unit roundoff times the weights' norm); int8 rounds each
    delta row to a grid of max|row|/127 (a factor 1 + sqrt(row length)/254); int8+topk sends a
    tensor's largest delta entries plus the residual the client kept from earlier rounds, which
    top-k keeps below 1/(1 - sqrt(1 - topk_fraction)) times one round's bound (each round sends
    at least that share of the accumulated delta's energy; the int8 rounding the residual also
    carries is left out, being far smaller), and rounds them on one scale per tensor
    (1 + sqrt(kept entries)/254): 20x the fp32 bound at topk_fraction 0.1, a loose bound.
    Only ROUNDING_SLACK is added as a margin: the bound is a worst case, and honest updates sit
    well below it (benchmarks/bench_voter_checks.py).
    Raises ValueError when train.max_steps is 0 (no cap on steps: no bound).
    """
    if train.max_steps < 1:
        raise ValueError(
            "train.max_steps is 0: the number of steps, and so the update, is unbounded"
        )
    numel = sum(t.numel() for t in reference.values())
    steps = train.max_steps
    adam = math.sqrt(numel) * train.lr * sum(adam_step_bound(t) for t in range(1, steps + 1))
    weights = norm(reference)
    trained = adam + steps * train.lr * train.weight_decay * (weights + adam)
    if transport in UNIT_ROUNDOFF:
        arrived = trained + UNIT_ROUNDOFF[transport] * (weights + trained)
    elif transport == "int8":
        row = max(t[0].numel() if t.dim() >= 2 else t.numel() for t in reference.values())
        arrived = trained * (1 + math.sqrt(row) / 254)
    else:  # int8+topk
        kept = max(max(1, math.ceil(topk_fraction * t.numel())) for t in reference.values())
        carried = 1 / (1 - math.sqrt(1 - topk_fraction))
        arrived = trained * carried * (1 + math.sqrt(kept) / 254)
    return ROUNDING_SLACK * arrived
