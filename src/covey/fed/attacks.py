"""Adversaries for robustness experiments: what a malicious participant sends or votes.

Update attacks turn an honest client's trained adapter into a malicious one, all relative to the
global adapter `g` the client started from and its honest delta `d = trained - g`:

| kind         | sends                                   | reference                              |
|--------------|-----------------------------------------|----------------------------------------|
| `sign_flip`  | g - strength * d                        | Fang et al. 2020; Li et al. 2019 (RSA)  |
| `noise`      | g + N(0, (strength * std(d))^2)         | Gaussian attack, Blanchard et al. 2017  |
| `scale`      | g + strength * d (model replacement)    | Bagdasaryan et al. 2020                 |
| `free_rider` | g unchanged, claiming its sample count  | Lin et al. 2019 (free-rider attacks)    |

Vote attacks (FLock voters) are decided in the FLock protocol: `random_vote` votes at random,
`always_accept` colludes with malicious proposers by accepting everything.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from covey.config import AttackConfig
from covey.errors import ConfigError
from covey.state import State

UPDATE_ATTACKS = ("sign_flip", "noise", "scale", "free_rider")
VOTE_ATTACKS = ("random_vote", "always_accept")
ATTACKS = ("none", *UPDATE_ATTACKS, *VOTE_ATTACKS)


def malicious_participants(n: int, cfg: AttackConfig) -> set[int]:
    """A seeded choice of ceil(fraction * n) participants (none without an attack)."""
    if cfg.kind == "none" or cfg.malicious_fraction == 0:
        return set()
    count = math.ceil(cfg.malicious_fraction * n)
    return {int(i) for i in np.random.default_rng(cfg.seed).permutation(n)[:count]}


def attack_update(
    kind: str, global_state: State, trained: State, strength: float, seed: int
) -> State:
    """The adapter a malicious client sends instead of `trained`."""
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for key, g in global_state.items():
        delta = trained[key].float() - g.float()
        if kind == "sign_flip":
            sent = g.float() - strength * delta
        elif kind == "scale":
            sent = g.float() + strength * delta
        elif kind == "noise":
            std = float(delta.std()) if delta.numel() > 1 else float(delta.abs().mean())
            noise = torch.randn(delta.shape, generator=generator) * (strength * max(std, 1e-8))
            sent = g.float() + noise
        elif kind == "free_rider":
            sent = g.float()
        else:
            raise ConfigError(f"{kind!r} is not an update attack; choose one of {UPDATE_ATTACKS}")
        out[key] = sent.to(g.dtype)
    return out
