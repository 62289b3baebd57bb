"""Server aggregation strategies: the next global adapter from the round's accepted updates.

A strategy opens an accumulator per round, `start(global_state)`; the round feeds it each
accepted update as it arrives, `add(state, weight)`, and closes it,
`finish(server_state, cfg) -> (new_global_state, new_server_state)`. `aggregate` is the same in
one call, for updates already in a list.

The FedAvg family's server step reads only the weighted mean of the updates, so `RunningMean`
sums them as they come and holds two adapters, however many clients train in a round. The robust
rules (coordinate-wise median, trimmed mean, Krum / Multi-Krum, norm clipping) need every update
at once: `KeptUpdates` keeps the round's updates and does the math on the list in `finish`, so
their memory grows with the updates merged per round. They keep no server state, so FLock's
ledger can use them too (`covey.config.FLOCK_STRATEGIES`).

Strategies keep nothing between rounds: whatever must persist (momentum, second moments) is in
the returned `ServerState`, which the engine saves next to each checkpoint (safetensors), so a
resumed run continues exactly. Server-state keys are `"<buffer>.<param key>"`: `momentum.` for
FedAvgM, `m.` and `v.` for the adaptive strategies.

Arithmetic is float32 whatever the adapter dtype (bf16 sums lose too much), and each returned
tensor has its key's original dtype; server-state tensors stay float32. Inputs are never mutated.
Weights (normally sample counts) are normalised, so only their ratios matter.

LoRA A and B matrices are averaged separately, as FedIT/Shepherd does. The average of the
products, mean(B_i @ A_i), is not mean(B_i) @ mean(A_i): this is a known approximation of
averaging the full weight updates, and it shrinks as clients start each round from the same
global adapter and drift little from it. Each robust rule's docstring says what it does to the
pair.

The robust rules ignore the weights (sample counts) but for leaving out zero-weight updates: a
count is the sender's claim, and these rules exist because senders are not trusted. They work on
deltas (update - global), so updates equal to the global adapter leave it exactly unchanged.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from covey.config import FedConfig
from covey.errors import ConfigError
from covey.state import ServerState, State, delta, flatten, norm

log = logging.getLogger("covey.fed")


class Accumulator(Protocol):
    """One round's aggregation in progress."""

    report: dict[str, Any]
    """What `finish` did with the updates, for the round record (`RoundRecord.aggregation`):
    empty for the FedAvg family; for a robust rule, per-update lists in the order the updates
    were added (None for a zero-weight update, left out) and the rule's bound."""

    def add(self, state: State, weight: float) -> None:
        """Take one accepted update with its weight (normally its sample count)."""

    def finish(self, server_state: ServerState, cfg: FedConfig) -> tuple[State, ServerState]:
        """The next global adapter and server state (the inputs unchanged when nothing was
        added)."""


class Strategy(Protocol):
    """What every aggregation strategy provides."""

    def start(self, global_state: State) -> Accumulator:
        """Open the aggregation of a round that started from `global_state`."""


def aggregate(
    strategy: Strategy,
    global_state: State,
    states: Sequence[State],
    weights: Sequence[float],
    server_state: ServerState,
    cfg: FedConfig,
) -> tuple[State, ServerState]:
    """`strategy` over updates already in a list: start, add each, finish."""
    if len(weights) != len(states):
        raise ValueError(f"got {len(states)} states but {len(weights)} weights")
    accumulator = strategy.start(global_state)
    for state, weight in zip(states, weights, strict=True):
        accumulator.add(state, weight)
    return accumulator.finish(server_state, cfg)


class RunningMean:
    """The weighted mean of the updates added so far, in O(1) adapters of memory.

    Kept as the first update plus the running sum of w_i * (state_i - first) in float32: summing
    offsets keeps the precision where it matters (the update), and identical updates average to
    themselves exactly. An update is checked (keys, shapes, weight) when it is added.
    """

    def __init__(self, global_state: State, step: MeanStep) -> None:
        self.global_state = global_state
        self._step = step
        self._first: State | None = None
        self._offset: State = {}
        self._weights: list[float] = []
        self.report: dict[str, Any] = {}

    def add(self, state: State, weight: float) -> None:
        w = _checked_weight(self.global_state, state, weight, len(self._weights))
        if self._first is None:
            self._first = state
            self._offset = {
                k: torch.zeros(p.shape, dtype=torch.float32, device=p.device)
                for k, p in self.global_state.items()
            }
        else:
            for key, acc in self._offset.items():
                first = self._first[key].to(device=acc.device, dtype=torch.float32)
                acc.add_(state[key].to(device=acc.device, dtype=torch.float32) - first, alpha=w)
        self._weights.append(w)

    def finish(self, server_state: ServerState, cfg: FedConfig) -> tuple[State, ServerState]:
        if self._first is None:
            return dict(self.global_state), dict(server_state)
        if math.fsum(self._weights) <= 0:
            raise ValueError(f"weights must sum to > 0, got {self._weights}")
        return self._step(self.global_state, self, server_state, cfg)

    def mean(self) -> State:
        """The weighted mean of the updates, in the global adapter's dtypes and devices."""
        assert self._first is not None, "no update was added"
        first, total = self._first, math.fsum(self._weights)
        return {
            k: (first[k].to(device=p.device, dtype=torch.float32) + self._offset[k] / total).to(
                p.dtype
            )
            for k, p in self.global_state.items()
        }

    def mean_delta(self) -> State:
        """mean - global, float32: the pseudo-gradient of the server optimizers (exactly zero
        when every update equals the global adapter)."""
        assert self._first is not None, "no update was added"
        first, total = self._first, math.fsum(self._weights)
        return {
            k: (first[k].to(device=p.device, dtype=torch.float32) - p.to(torch.float32))
            + self._offset[k] / total
            for k, p in self.global_state.items()
        }


MeanStep = Callable[[State, RunningMean, ServerState, FedConfig], tuple[State, ServerState]]
"""A FedAvg-family server step: (global_state, the round's mean, server_state, cfg) ->
(new global state, new server state)."""


@dataclass(frozen=True)
class MeanStrategy:
    """A strategy whose server step needs only the weighted mean of the updates."""

    step: MeanStep

    def start(self, global_state: State) -> RunningMean:
        return RunningMean(global_state, self.step)


def _checked_weight(reference: State, state: State, weight: float, index: int) -> float:
    """The `index`-th update's weight as a float, once it and the update's keys are checked."""
    w = float(weight)
    if not math.isfinite(w) or w < 0:
        raise ValueError(f"state {index}: weight must be finite and >= 0, got {weight}")
    _check_keys(reference, state, index)
    return w


def _check_keys(reference: State, state: State, index: int) -> None:
    """Aggregation needs identical key sets and shapes; validation should have ensured it."""
    if state.keys() != reference.keys():
        missing = sorted(reference.keys() - state.keys())
        extra = sorted(state.keys() - reference.keys())
        raise ValueError(
            f"state {index} keys differ: missing {missing[:1]}, unexpected {extra[:1]}"
        )
    for key, ref in reference.items():
        if state[key].shape != ref.shape:
            raise ValueError(
                f"state {index}: {key} has shape {tuple(state[key].shape)}, "
                f"expected {tuple(ref.shape)}"
            )


def fedavg(
    global_state: State, mean: RunningMean, server_state: ServerState, cfg: FedConfig
) -> tuple[State, ServerState]:
    """FedAvg (McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from
    Decentralized Data", AISTATS): the sample-count-weighted mean of the client adapters.

    Stateless: `server_state` is returned as given (normally `{}`).
    """
    return mean.mean(), dict(server_state)


def fedprox(
    global_state: State, mean: RunningMean, server_state: ServerState, cfg: FedConfig
) -> tuple[State, ServerState]:
    """FedProx (Li et al. 2020, "Federated Optimization in Heterogeneous Networks", MLSys).

    The server side is plain FedAvg; what makes it FedProx is the proximal term
    mu/2 * ||w - w_global||^2 in each client's local loss, set by `train.prox_mu`.
    """
    return fedavg(global_state, mean, server_state, cfg)


def fedavgm(
    global_state: State, mean: RunningMean, server_state: ServerState, cfg: FedConfig
) -> tuple[State, ServerState]:
    """FedAvgM (Hsu et al. 2019, "Measuring the Effects of Non-Identical Data Distribution for
    Federated Visual Classification"): server momentum on the averaged update.

    delta = avg - global; v = server_momentum * v + delta; new = global + server_lr * v.
    With server_momentum=0 and server_lr=1 it is FedAvg. Buffer keys: `momentum.<key>`, zero
    when missing.
    """
    mean_delta = mean.mean_delta()
    new_state: State = {}
    new_server: ServerState = {}
    for key, param in global_state.items():
        g = param.to(torch.float32)
        v = _buffer(server_state, f"momentum.{key}", param, 0.0)
        v = cfg.server_momentum * v + mean_delta[key]
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
    mean: RunningMean,
    server_state: ServerState,
    cfg: FedConfig,
) -> tuple[State, ServerState]:
    """Algorithm 2 of Reddi et al. 2021; `kind` picks the second-moment update."""
    b1, b2, tau, lr = cfg.beta1, cfg.beta2, cfg.tau, cfg.server_lr
    mean_delta = mean.mean_delta()
    new_state: State = {}
    new_server: ServerState = {}
    for key, param in global_state.items():
        g = param.to(torch.float32)
        step = mean_delta[key]  # the pseudo-gradient avg - global, pointing downhill
        m = b1 * _buffer(server_state, f"m.{key}", param, 0.0) + (1 - b1) * step
        v = _buffer(server_state, f"v.{key}", param, tau * tau)  # paper: v_{-1} >= tau^2
        d2 = step * step
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
    global_state: State, mean: RunningMean, server_state: ServerState, cfg: FedConfig
) -> tuple[State, ServerState]:
    """FedAdam (Reddi et al. 2021, "Adaptive Federated Optimization", ICLR, Algorithm 2).

    delta = avg - global; m = beta1*m + (1-beta1)*delta; v = beta2*v + (1-beta2)*delta^2;
    new = global + server_lr * m / (sqrt(v) + tau). No bias correction, as in the paper;
    m starts at 0 and v at tau^2.
    """
    return _adaptive("adam", global_state, mean, server_state, cfg)


def fedyogi(
    global_state: State, mean: RunningMean, server_state: ServerState, cfg: FedConfig
) -> tuple[State, ServerState]:
    """FedYogi (Reddi et al. 2021, "Adaptive Federated Optimization", ICLR, Algorithm 2).

    As FedAdam but v = v - (1-beta2)*delta^2*sign(v - delta^2): v grows additively and shrinks
    slowly, which the paper finds more robust than Adam's multiplicative decay.
    """
    return _adaptive("yogi", global_state, mean, server_state, cfg)


def fedadagrad(
    global_state: State, mean: RunningMean, server_state: ServerState, cfg: FedConfig
) -> tuple[State, ServerState]:
    """FedAdagrad (Reddi et al. 2021, "Adaptive Federated Optimization", ICLR, Algorithm 2).

    v = v + delta^2 (beta2 unused); like the paper, m still uses beta1 (beta1=0 gives plain
    Adagrad on the pseudo-gradient).
    """
    return _adaptive("adagrad", global_state, mean, server_state, cfg)


# ---------------------------------------------------------------- robust rules: every update kept


class KeptUpdates:
    """The updates added so far, kept for a rule that needs them all at once; each is checked
    (keys, shapes, weight) when it is added."""

    def __init__(self, global_state: State, step: ListStep) -> None:
        self.global_state = global_state
        self._step = step
        self.states: list[State] = []
        self.weights: list[float] = []
        self.report: dict[str, Any] = {}

    def add(self, state: State, weight: float) -> None:
        w = _checked_weight(self.global_state, state, weight, len(self.weights))
        self.states.append(state)
        self.weights.append(w)

    def finish(self, server_state: ServerState, cfg: FedConfig) -> tuple[State, ServerState]:
        if not self.states:
            return dict(self.global_state), dict(server_state)
        if math.fsum(self.weights) <= 0:
            raise ValueError(f"weights must sum to > 0, got {self.weights}")
        positions = [i for i, w in enumerate(self.weights) if w > 0]
        deltas = [delta(self.states[i], self.global_state) for i in positions]
        report: dict[str, Any] = {"delta_norm": [norm(d) for d in deltas]}
        new_delta = self._step(deltas, [self.weights[i] for i in positions], cfg, report)
        for key, value in report.items():  # per-update lists back to the order of `add`
            if isinstance(value, list):
                spread_out: list[Any] = [None] * len(self.weights)
                for position, item in zip(positions, value, strict=True):
                    spread_out[position] = item
                value = spread_out
            self.report[key] = value
        return {
            k: (p.to(torch.float32) + new_delta[k]).to(p.dtype)
            for k, p in self.global_state.items()
        }, dict(server_state)


ListStep = Callable[[list[State], list[float], FedConfig, dict[str, Any]], State]
"""A robust rule: (the round's deltas update - global in float32, their weights, cfg, report)
-> the delta to add to the global adapter. `report` arrives holding each delta's L2 norm
(`delta_norm`, computed once for every rule); the rule adds what it chose (lists with one item
per delta), and the round record keeps it."""


@dataclass(frozen=True)
class KeepAllStrategy:
    """A strategy whose server step needs every update of the round."""

    step: ListStep

    def start(self, global_state: State) -> KeptUpdates:
        return KeptUpdates(global_state, self.step)


def median(
    deltas: list[State], weights: list[float], cfg: FedConfig, report: dict[str, Any]
) -> State:
    """Coordinate-wise median (Yin et al. 2018, "Byzantine-Robust Distributed Learning: Towards
    Optimal Statistical Rates", ICML): each coordinate of the new delta is the median of that
    coordinate over the updates (the mean of the two middle values for an even count).

    Stays within the honest values of every coordinate while fewer than half of the updates are
    malicious. LoRA: A and B are taken coordinate by coordinate, so neither matrix, nor their
    product, need be any one client's; like FedAvg's separate averaging, an approximation that
    shrinks as the clients drift little from the global adapter.
    """
    n = len(deltas)
    out = {}
    for key in deltas[0]:
        ordered = torch.sort(_stacked(deltas, key), dim=0).values
        out[key] = (ordered[(n - 1) // 2] + ordered[n // 2]) / 2
    return out


def trimmed_mean(
    deltas: list[State], weights: list[float], cfg: FedConfig, report: dict[str, Any]
) -> State:
    """Coordinate-wise trimmed mean (Yin et al. 2018, "Byzantine-Robust Distributed Learning:
    Towards Optimal Statistical Rates", ICML): per coordinate, drop the floor(trim_fraction * n)
    largest and as many smallest values of the n updates and average the rest.

    Tolerates up to that many malicious updates per coordinate. LoRA: as the median, A and B
    are trimmed coordinate by coordinate, so the kept values may come from different clients.
    """
    n = len(deltas)
    cut = math.floor(cfg.trim_fraction * n)  # < n / 2, since trim_fraction < 0.5
    if cut == 0 and cfg.trim_fraction > 0 and n > 1:
        # A silent plain mean would read as "trimmed mean held" in any comparison.
        log.warning(
            "trimmed_mean: fed.trim_fraction=%s of %d updates trims none (floor(%s x %d) = 0), "
            "so this round is a plain unweighted mean; set fed.trim_fraction >= %.3f to drop one "
            "update at each end",
            cfg.trim_fraction, n, cfg.trim_fraction, n, 1 / n,
        )  # fmt: skip
    report["trimmed_each_end"] = cut
    out = {}
    for key in deltas[0]:
        ordered = torch.sort(_stacked(deltas, key), dim=0).values
        out[key] = ordered[cut : n - cut].mean(dim=0)
    return out


def krum(
    deltas: list[State], weights: list[float], cfg: FedConfig, report: dict[str, Any]
) -> State:
    """Krum (Blanchard et al. 2017, "Machine Learning with Adversaries: Byzantine Tolerant
    Gradient Descent", NeurIPS): the one update closest to its neighbours.

    Each update's score is the sum of squared L2 distances (over the whole adapter) to its
    n - f - 2 nearest others (at least 1, as Flower's Krum), f = `fed.krum_byzantine`; the lowest
    score wins. Krum needs n > 2f + 2 to carry its guarantee. LoRA: a whole update is chosen, so
    the new adapter is one client's, its A and B a matched pair.
    """
    return _multi_krum(deltas, cfg.krum_byzantine, 1, report)


def multi_krum(
    deltas: list[State], weights: list[float], cfg: FedConfig, report: dict[str, Any]
) -> State:
    """Multi-Krum (Blanchard et al. 2017, "Machine Learning with Adversaries: Byzantine
    Tolerant Gradient Descent", NeurIPS, section 5): the unweighted mean of the m best
    Krum-scored updates, m = `fed.krum_keep`, or n - f when that is 0.

    LoRA: whole updates are selected, then A and B are averaged separately over them (FedAvg's
    approximation, among the selected only).
    """
    n, f = len(deltas), cfg.krum_byzantine
    keep = cfg.krum_keep or n - f
    return _multi_krum(deltas, f, max(1, min(keep, n)), report)


def _multi_krum(deltas: list[State], byzantine: int, keep: int, report: dict[str, Any]) -> State:
    n = len(deltas)
    if n <= 2 * byzantine + 2:
        log.warning(
            "krum: %d updates with fed.krum_byzantine=%d: Krum's guarantee needs more than "
            "2f + 2 = %d updates per round; the selection still runs, without it",
            n, byzantine, 2 * byzantine + 2,
        )  # fmt: skip
    flat = torch.stack([flatten(d) for d in deltas])
    distances = torch.cdist(flat.double(), flat.double()).pow(2)
    neighbours = max(1, n - byzantine - 2)
    scores = []
    for i in range(n):
        others = torch.cat([distances[i, :i], distances[i, i + 1 :]])
        scores.append(float(torch.sort(others).values[:neighbours].sum()) if n > 1 else 0.0)
    chosen = sorted(range(n), key=lambda i: (scores[i], i))[:keep]  # ties: the earlier update
    report["krum_score"] = scores
    report["kept"] = [i in chosen for i in range(n)]
    return {k: torch.stack([deltas[i][k] for i in chosen]).mean(dim=0) for k in deltas[0]}


def norm_clip(
    deltas: list[State], weights: list[float], cfg: FedConfig, report: dict[str, Any]
) -> State:
    """Server-side norm clipping (Sun et al. 2019, "Can You Really Backdoor Federated
    Learning?", arXiv:1911.07963): each update's delta is scaled down to an L2 norm (over the
    whole adapter) of at most `fed.clip_norm`, or, when that is 0, the round's median delta
    norm; then the clipped deltas are averaged with their weights, as FedAvg.

    With the median bound, a scaled (model-replacement) update counts for no more than a typical
    one. LoRA: A's and B's deltas of one client are scaled by the same factor c, so the
    product's first-order change scales by c and its B_delta @ A_delta term by c^2.
    """
    norms = report["delta_norm"]
    bound = cfg.clip_norm or float(torch.tensor(norms, dtype=torch.float64).quantile(0.5))
    total = math.fsum(weights)
    scales = [min(1.0, bound / size) if size > 0 else 1.0 for size in norms]
    report |= {"clip_bound": bound, "clip_scale": scales}
    out = {k: torch.zeros_like(t) for k, t in deltas[0].items()}
    for update, scale, weight in zip(deltas, scales, weights, strict=True):
        for key, acc in out.items():
            acc.add_(update[key], alpha=scale * weight / total)
    return out


def _stacked(deltas: list[State], key: str) -> torch.Tensor:
    return torch.stack([d[key] for d in deltas])


STRATEGIES: dict[str, Strategy] = {
    "fedavg": MeanStrategy(fedavg),
    "fedprox": MeanStrategy(fedprox),
    "fedavgm": MeanStrategy(fedavgm),
    "fedadam": MeanStrategy(fedadam),
    "fedyogi": MeanStrategy(fedyogi),
    "fedadagrad": MeanStrategy(fedadagrad),
    "median": KeepAllStrategy(median),
    "trimmed_mean": KeepAllStrategy(trimmed_mean),
    "krum": KeepAllStrategy(krum),
    "multi_krum": KeepAllStrategy(multi_krum),
    "norm_clip": KeepAllStrategy(norm_clip),
}


def get_strategy(name: str) -> Strategy:
    """The strategy called `name` (`fed.strategy`)."""
    try:
        return STRATEGIES[name]
    except KeyError:
        raise ConfigError(
            f"fed.strategy: unknown strategy {name!r}; known: {', '.join(STRATEGIES)}"
        ) from None
