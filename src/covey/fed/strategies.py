"""Server aggregation strategies: pure functions from client adapters to the next global adapter.

Every strategy has the same signature,
`(global_state, states, weights, server_state, cfg) -> (new_global_state, new_server_state)`,
and keeps nothing between calls: whatever must persist across rounds (momentum, second moments)
is in the returned `ServerState`, which the engine saves next to each checkpoint (safetensors), so
a resumed run continues exactly. Server-state keys are `"<buffer>.<param key>"`: `momentum.` for
FedAvgM, `m.` and `v.` for the adaptive strategies.

Arithmetic is float32 whatever the adapter dtype (bf16 sums lose too much), and each returned
tensor has its key's original dtype; server-state tensors stay float32. Inputs are never mutated.
Weights (normally sample counts) are normalised, so only their ratios matter.

LoRA A and B matrices are averaged separately, as FedIT/Shepherd does. The average of the
products, mean(B_i @ A_i), is not mean(B_i) @ mean(A_i): this is a known approximation of
averaging the full weight updates, and it shrinks as clients start each round from the same
global adapter and drift little from it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol

import torch

from covey.config import FedConfig
from covey.errors import ConfigError
from covey.state import ServerState, State


class Strategy(Protocol):
    """The common signature of every aggregation strategy."""

    def __call__(
        self,
        global_state: State,
        states: Sequence[State],
        weights: Sequence[float],
        server_state: ServerState,
        cfg: FedConfig,
    ) -> tuple[State, ServerState]: ...


def _normalised(weights: Sequence[float], count: int) -> list[float]:
    if len(weights) != count:
        raise ValueError(f"got {count} states but {len(weights)} weights")
    values = [float(w) for w in weights]
    if any(not math.isfinite(w) or w < 0 for w in values):
        raise ValueError(f"weights must be finite and >= 0, got {values}")
    total = math.fsum(values)
    if total <= 0:
        raise ValueError(f"weights must sum to > 0, got {values}")
    return [w / total for w in values]


def _check_keys(reference: State, states: Sequence[State]) -> None:
    """Aggregation needs identical key sets and shapes; validation should have ensured it."""
    for i, state in enumerate(states):
        if state.keys() != reference.keys():
            missing = sorted(reference.keys() - state.keys())
            extra = sorted(state.keys() - reference.keys())
            raise ValueError(
                f"state {i} keys differ: missing {missing[:1]}, unexpected {extra[:1]}"
            )
        for key, ref in reference.items():
            if state[key].shape != ref.shape:
                raise ValueError(
                    f"state {i}: {key} has shape {tuple(state[key].shape)}, "
                    f"expected {tuple(ref.shape)}"
                )


def _mean_offset(states: Sequence[State], weights: Sequence[float], anchor: State) -> State:
    """sum_i w_i * (state_i - anchor) with normalised weights: float32, on the anchor's devices.

    Summing offsets rather than raw values keeps the precision where it matters (the update) and
    makes the result exactly zero when every state equals the anchor, so adaptive strategies do
    not amplify rounding noise into a step.
    """
    if not states:
        raise ValueError("cannot average an empty list of states")
    norm = _normalised(weights, len(states))
    _check_keys(anchor, states)
    out: State = {}
    for key, ref in anchor.items():
        base = ref.to(torch.float32)
        acc: torch.Tensor | None = None
        for state, w in zip(states, norm, strict=True):
            # out of place: a new tensor, so add_ below never writes into an input
            term = (state[key].to(device=ref.device, dtype=torch.float32) - base) * w
            acc = term if acc is None else acc.add_(term)
        assert acc is not None
        out[key] = acc
    return out


def weighted_average(states: Sequence[State], weights: Sequence[float]) -> State:
    """The weighted mean of `states` (weights normalised), in the first state's dtypes.

    Computed as first + mean offset from it, so identical states average to themselves exactly.
    """
    if not states:
        raise ValueError("cannot average an empty list of states")
    first = states[0]
    offset = _mean_offset(states, weights, first)
    return {k: (first[k].to(torch.float32) + offset[k]).to(first[k].dtype) for k in first}


def _unchanged(global_state: State, server_state: ServerState) -> tuple[State, ServerState]:
    return dict(global_state), dict(server_state)


def fedavg(
    global_state: State,
    states: Sequence[State],
    weights: Sequence[float],
    server_state: ServerState,
    cfg: FedConfig,
) -> tuple[State, ServerState]:
    """FedAvg (McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from
    Decentralized Data", AISTATS): the sample-count-weighted mean of the client adapters.

    Stateless: `server_state` is returned as given (normally `{}`).
    """
    if not states:
        return _unchanged(global_state, server_state)
    _check_keys(global_state, states)
    avg = weighted_average(states, weights)
    new = {k: avg[k].to(device=p.device, dtype=p.dtype) for k, p in global_state.items()}
    return new, dict(server_state)


def fedprox(
    global_state: State,
    states: Sequence[State],
    weights: Sequence[float],
    server_state: ServerState,
    cfg: FedConfig,
) -> tuple[State, ServerState]:
    """FedProx (Li et al. 2020, "Federated Optimization in Heterogeneous Networks", MLSys).

    The server side is plain FedAvg; what makes it FedProx is the proximal term
    mu/2 * ||w - w_global||^2 in each client's local loss, set by `train.prox_mu`.
    """
    return fedavg(global_state, states, weights, server_state, cfg)


def fedavgm(
    global_state: State,
    states: Sequence[State],
    weights: Sequence[float],
    server_state: ServerState,
    cfg: FedConfig,
) -> tuple[State, ServerState]:
    """FedAvgM (Hsu et al. 2019, "Measuring the Effects of Non-Identical Data Distribution for
    Federated Visual Classification"): server momentum on the averaged update.

    delta = avg - global; v = server_momentum * v + delta; new = global + server_lr * v.
    With server_momentum=0 and server_lr=1 it is FedAvg. Buffer keys: `momentum.<key>`, zero
    when missing.
    """
    if not states:
        return _unchanged(global_state, server_state)
    mean_delta = _mean_offset(states, weights, global_state)
    new_state: State = {}
    new_server: ServerState = {}
    for key, param in global_state.items():
        g = param.to(torch.float32)
        delta = mean_delta[key]
        v = _buffer(server_state, f"momentum.{key}", param, 0.0)
        v = cfg.server_momentum * v + delta
        new_server[f"momentum.{key}"] = v
        new_state[key] = (g + cfg.server_lr * v).to(param.dtype)
    return new_state, new_server


def _buffer(server_state: ServerState, name: str, param: torch.Tensor, fill: float) -> torch.Tensor:
    """A float32 server buffer for `param`, or `fill` when a fresh run has none yet."""
    old = server_state.get(name)
    if old is None:
        return torch.full(param.shape, fill, dtype=torch.float32, device=param.device)
    if old.shape != param.shape:
        raise ValueError(
            f"server state {name} has shape {tuple(old.shape)}, expected {tuple(param.shape)}"
        )
    return old.to(device=param.device, dtype=torch.float32)


def _adaptive(
    kind: str,
    global_state: State,
    states: Sequence[State],
    weights: Sequence[float],
    server_state: ServerState,
    cfg: FedConfig,
) -> tuple[State, ServerState]:
    """Algorithm 2 of Reddi et al. 2021; `kind` picks the second-moment update."""
    if not states:
        return _unchanged(global_state, server_state)
    b1, b2, tau, lr = cfg.beta1, cfg.beta2, cfg.tau, cfg.server_lr
    mean_delta = _mean_offset(states, weights, global_state)
    new_state: State = {}
    new_server: ServerState = {}
    for key, param in global_state.items():
        g = param.to(torch.float32)
        delta = mean_delta[key]  # the pseudo-gradient avg - global, pointing downhill
        m = b1 * _buffer(server_state, f"m.{key}", param, 0.0) + (1 - b1) * delta
        v = _buffer(server_state, f"v.{key}", param, tau * tau)  # paper: v_{-1} >= tau^2
        d2 = delta * delta
        if kind == "adam":
            v = b2 * v + (1 - b2) * d2
        elif kind == "yogi":
            v = v - (1 - b2) * d2 * torch.sign(v - d2)
        else:  # adagrad
            v = v + d2
        new_server[f"m.{key}"] = m
        new_server[f"v.{key}"] = v
        new_state[key] = (g + lr * m / (torch.sqrt(v) + tau)).to(param.dtype)
    return new_state, new_server


def fedadam(
    global_state: State,
    states: Sequence[State],
    weights: Sequence[float],
    server_state: ServerState,
    cfg: FedConfig,
) -> tuple[State, ServerState]:
    """FedAdam (Reddi et al. 2021, "Adaptive Federated Optimization", ICLR, Algorithm 2).

    delta = avg - global; m = beta1*m + (1-beta1)*delta; v = beta2*v + (1-beta2)*delta^2;
    new = global + server_lr * m / (sqrt(v) + tau). No bias correction, as in the paper;
    m starts at 0 and v at tau^2.
    """
    return _adaptive("adam", global_state, states, weights, server_state, cfg)


def fedyogi(
    global_state: State,
    states: Sequence[State],
    weights: Sequence[float],
    server_state: ServerState,
    cfg: FedConfig,
) -> tuple[State, ServerState]:
    """FedYogi (Reddi et al. 2021, "Adaptive Federated Optimization", ICLR, Algorithm 2).

    As FedAdam but v = v - (1-beta2)*delta^2*sign(v - delta^2): v grows additively and shrinks
    slowly, which the paper finds more robust than Adam's multiplicative decay.
    """
    return _adaptive("yogi", global_state, states, weights, server_state, cfg)


def fedadagrad(
    global_state: State,
    states: Sequence[State],
    weights: Sequence[float],
    server_state: ServerState,
    cfg: FedConfig,
) -> tuple[State, ServerState]:
    """FedAdagrad (Reddi et al. 2021, "Adaptive Federated Optimization", ICLR, Algorithm 2).

    v = v + delta^2 (beta2 unused); like the paper, m still uses beta1 (beta1=0 gives plain
    Adagrad on the pseudo-gradient).
    """
    return _adaptive("adagrad", global_state, states, weights, server_state, cfg)


STRATEGIES: dict[str, Strategy] = {
    "fedavg": fedavg,
    "fedprox": fedprox,
    "fedavgm": fedavgm,
    "fedadam": fedadam,
    "fedyogi": fedyogi,
    "fedadagrad": fedadagrad,
}


def get_strategy(name: str) -> Strategy:
    """The strategy called `name` (`fed.strategy`)."""
    try:
        return STRATEGIES[name]
    except KeyError:
        raise ConfigError(
            f"fed.strategy: unknown strategy {name!r}; known: {', '.join(STRATEGIES)}"
        ) from None
