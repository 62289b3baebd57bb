"""The client half of a round, written once for every engine: train, attack, encode.

A client starts from the round's global adapter, trains on its own examples (`train_local`),
replaces the result with an attack's when it is a robustness experiment's attacker
(`covey.fed.attacks`), and encodes what it sends as `fed.transport` says, against the global
adapter, carrying its error-feedback residual under `int8+topk`. The embedded engine
(`covey.fed.engine`), the Flower ClientApp (`covey.flower.client_app`) and the FLock
participant (`covey.flock.agent`) all call `client_update`; each keeps its own seed, its own
place for the residual and its own envelope for the bytes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from covey.config import TrainConfig
from covey.data.prompts import Example
from covey.fed.attacks import attack_update, honest_estimates
from covey.fed.transport import Codec, ErrorFeedback, encode_update
from covey.state import State
from covey.train.local import StepCallback, train_local


@dataclass(frozen=True)
class UpdateAttack:
    """What a malicious client does to its update (experiment ground truth): `kind` is one of
    `covey.fed.attacks.UPDATE_ATTACKS`, `strength` its `attack.strength`, `estimate_shards`
    the `attack.estimate_shards` a `little_is_enough` attacker trains on."""

    kind: str
    strength: float
    estimate_shards: int


@dataclass
class ClientUpdate:
    """What one client's round produced: `wire`, the update encoded for `fed.transport`
    against the global adapter; the sample count and training metrics it reports (no metrics
    when it did not train)."""

    wire: State
    num_samples: int
    metrics: dict[str, float] = field(default_factory=dict)


def client_update(
    model: Any,
    pad_id: int,
    examples: Sequence[Example],
    global_state: State,
    train: TrainConfig,
    seed: int,
    codec: Codec,
    *,
    feedback: ErrorFeedback | None = None,
    attack: UpdateAttack | None = None,
    free_rider_trains: bool = True,
    on_step: StepCallback | None = None,
) -> ClientUpdate:
    """Train `model`'s adapter from `global_state` on `examples` (seeded by `seed`), attack it
    when `attack` is set, and encode it with `codec`; `feedback` (int8+topk) is the client's
    residual, added to this update and replaced by what this encoding leaves out.

    `free_rider_trains`: the simulations train a free rider anyway, so its round records show
    a loss like any client's; a FLock participant skips the work it would throw away. What a
    free rider sends is the global adapter either way.
    """
    if attack is not None and attack.kind == "free_rider" and not free_rider_trains:
        state, num_samples, metrics = global_state, len(examples), {}
    else:
        result = train_local(model, examples, global_state, train, seed, pad_id, on_step=on_step)
        state, num_samples, metrics = result.state, result.num_samples, result.metrics
    if attack is not None:
        estimates = honest_estimates(
            attack.kind, attack.estimate_shards, examples, seed,
            lambda shard, s: train_local(model, shard, global_state, train, s, pad_id).state,
        )  # fmt: skip
        state = attack_update(attack.kind, global_state, state, attack.strength, seed, estimates)
    wire = encode_update(state, global_state, codec, feedback)
    return ClientUpdate(wire=wire, num_samples=num_samples, metrics=metrics)
