"""Adversaries for robustness experiments: what a malicious participant trains on, sends or votes.

Update attacks turn an honest client's trained adapter into a malicious one, all relative to the
global adapter `g` the client started from and its honest delta `d = trained - g`:

| kind               | sends                                         | reference                   |
|--------------------|-----------------------------------------------|-----------------------------|
| `sign_flip`        | g - strength * d (1: negated, not amplified)  | Fang et al. 2020            |
| `noise`            | g + N(0, (strength * std(d))^2)               | Blanchard et al. 2017       |
| `scale`            | g + strength * d (model replacement)          | Bagdasaryan et al. 2020     |
| `free_rider`       | g unchanged, claiming its sample count        | Lin et al. 2019             |
| `backdoor`         | g + strength * d, trained on poisoned data    | Bagdasaryan et al. 2020     |
| `little_is_enough` | g + mean(e) - strength * std(e) * sign(mean(e)) | Baruch et al. 2019        |

`backdoor` poisons the attacker's training data before it trains (`poison_records`): a share
`attack.poison_fraction` of its records gets the rare phrase `attack.trigger` at the start of the
instruction and `attack.target` as the response; the rest stay clean, so the update also helps
on clean data. Strength 1 is plain data poisoning; above 1 it is scaled towards model
replacement.

`little_is_enough` (Baruch et al. 2019, "A Little Is Enough: Circumventing Defenses For
Distributed Learning", NeurIPS) moves each coordinate against the honest mean by `strength`
(z) standard deviations of the honest updates, small enough to hide among them. Threat model:
the attacker sees no other participant's update. It estimates the honest updates' mean and
spread `e` from its own data, as the paper proposes when the attacker cannot see them: it trains
honestly from g on `attack.estimate_shards` disjoint shards of its own data (the same recipe,
so each shard's update stands in for one honest client's) and takes their coordinate-wise mean
and standard deviation. The estimate misses the spread that comes from other clients' data being
different (non-IID), so the attack is, if anything, more timid than one that sees the round.

Vote attacks (FLock voters) are decided in the FLock protocol: `random_vote` votes at random,
`always_accept` colludes with malicious proposers by accepting everything.

Who is malicious is experiment ground truth (`malicious_participants`), recorded in every round
record (`attacker`); no defence reads it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import TypeVar

import numpy as np
import torch

from covey.config import AttackConfig
from covey.data.records import Record
from covey.errors import ConfigError
from covey.state import State, delta

UPDATE_ATTACKS = (
    "sign_flip", "noise", "scale", "free_rider", "backdoor", "little_is_enough"
)  # fmt: skip
VOTE_ATTACKS = ("random_vote", "always_accept")
ATTACKS = ("none", *UPDATE_ATTACKS, *VOTE_ATTACKS)

T = TypeVar("T")


def malicious_participants(n: int, cfg: AttackConfig) -> set[int]:
    """A seeded choice of ceil(fraction * n) participants (none without an attack)."""
    if cfg.kind == "none" or cfg.malicious_fraction == 0:
        return set()
    count = math.ceil(cfg.malicious_fraction * n)
    return {int(i) for i in np.random.default_rng(cfg.seed).permutation(n)[:count]}


def attack_update(
    kind: str,
    global_state: State,
    trained: State,
    strength: float,
    seed: int,
    estimates: Sequence[State] = (),
) -> State:
    """The adapter a malicious client sends instead of `trained` (`estimates`: its estimate of
    the honest updates, which `little_is_enough` needs; see `honest_estimates`)."""
    if kind == "little_is_enough":
        return little_is_enough(global_state, estimates, strength)
    generator = torch.Generator().manual_seed(seed)
    deltas = delta(trained, global_state)
    out = {}
    for key, g in global_state.items():
        change = deltas[key]
        if kind == "sign_flip":
            sent = g.float() - strength * change
        elif kind in ("scale", "backdoor"):
            sent = g.float() + strength * change
        elif kind == "noise":
            std = float(change.std()) if change.numel() > 1 else float(change.abs().mean())
            noise = torch.randn(change.shape, generator=generator) * (strength * max(std, 1e-8))
            sent = g.float() + noise
        elif kind == "free_rider":
            sent = g.float()
        else:
            raise ConfigError(f"{kind!r} is not an update attack; choose one of {UPDATE_ATTACKS}")
        out[key] = sent.to(g.dtype)
    return out


def little_is_enough(global_state: State, estimates: Sequence[State], z: float) -> State:
    """g + mu - z * sigma * sign(mu), per coordinate, where mu and sigma are the mean and
    (unbiased) standard deviation of the estimated honest deltas `estimates - g`."""
    if len(estimates) < 2:
        raise ValueError(f"little_is_enough needs >= 2 estimated updates, got {len(estimates)}")
    estimated = [delta(e, global_state) for e in estimates]
    out = {}
    for key, g in global_state.items():
        deltas = torch.stack([d[key] for d in estimated])
        mean, std = deltas.mean(dim=0), deltas.std(dim=0)
        out[key] = (g.float() + mean - z * std * torch.sign(mean)).to(g.dtype)
    return out


def honest_estimates(
    kind: str,
    shards: int,
    examples: Sequence[T],
    seed: int,
    train: Callable[[list[T], int], State],
) -> list[State]:
    """What a `little_is_enough` attacker trains to estimate the honest updates: `train(shard,
    seed)` on each of `shards` (`attack.estimate_shards`) disjoint, seeded shards of its own
    `examples`; nothing for other attacks. `train` starts from the round's global adapter, as
    an honest client does."""
    if kind != "little_is_enough":
        return []
    count = min(shards, len(examples))
    if count < 2:
        raise ConfigError(
            f"attack.kind = 'little_is_enough' needs >= 2 training examples per attacker to "
            f"estimate the honest updates; this one has {len(examples)}"
        )
    order = np.random.default_rng(seed).permutation(len(examples))
    parts = [[examples[int(i)] for i in part] for part in np.array_split(order, count)]
    return [train(part, seed + 1 + i) for i, part in enumerate(parts)]


def with_trigger(record: Record, trigger: str) -> Record:
    """`record` with the backdoor's trigger phrase at the start of its instruction."""
    return dataclasses.replace(record, instruction=f"{trigger} {record.instruction}")


def poison_records(records: Sequence[Record], cfg: AttackConfig, participant: int) -> list[Record]:
    """A backdoor attacker's training data: a seeded ceil(poison_fraction * n) of `records`
    get the trigger in the instruction and the target as the response; order is kept."""
    count = math.ceil(cfg.poison_fraction * len(records))
    rng = np.random.default_rng([cfg.seed, participant])
    poisoned = {int(i) for i in rng.permutation(len(records))[:count]}
    return [
        dataclasses.replace(with_trigger(r, cfg.trigger), response=cfg.target)
        if i in poisoned
        else r
        for i, r in enumerate(records)
    ]
