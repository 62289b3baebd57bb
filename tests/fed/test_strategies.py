"""Aggregation strategies against hand-computed values on one- and two-element tensors."""

from __future__ import annotations

import gc
import logging
import math
import weakref
from typing import Any

import pytest
import torch

from covey.config import FedConfig
from covey.errors import ConfigError
from covey.fed.strategies import STRATEGIES, ServerState, State, aggregate, get_strategy

ALL = sorted(STRATEGIES)
A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


def st(values: list[float], dtype: torch.dtype = torch.float32) -> State:
    """A one-key state holding `values`."""
    return {"w": torch.tensor(values, dtype=dtype)}


def lora_state(seed: int, dtype: torch.dtype = torch.float32) -> State:
    g = torch.Generator().manual_seed(seed)
    return {
        A: torch.randn(2, 3, generator=g).to(dtype),
        B: torch.randn(3, 2, generator=g).to(dtype),
    }


def clone(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in state.items()}


def assert_state(got: dict[str, torch.Tensor], want: dict[str, list[float]]) -> None:
    assert got.keys() == want.keys()
    for key, values in want.items():
        torch.testing.assert_close(
            got[key].double(), torch.tensor(values, dtype=torch.float64), rtol=1e-6, atol=1e-7
        )


def run(
    name: str,
    glob: State,
    states: list[State],
    weights: list[float],
    server: ServerState,
    cfg: FedConfig,
) -> tuple[State, ServerState]:
    """The strategy `name` over a list of updates (start, add each, finish)."""
    return aggregate(get_strategy(name), glob, states, weights, server, cfg)


# ---- FedAvg / FedProx ----


@pytest.mark.parametrize("name", ["fedavg", "fedprox"])
def test_fedavg_weighted_by_samples(name: str) -> None:
    glob = st([100.0, -100.0])  # FedAvg ignores the old global values
    states = [st([0.0, 10.0]), st([4.0, 2.0]), st([8.0, 0.0])]
    # weights 1, 1, 2: ([0,10] + [4,2] + 2*[8,0]) / 4 = [5.0, 3.0]
    new, server = run(name, glob, states, [10, 10, 20], {}, FedConfig())
    assert_state(new, {"w": [5.0, 3.0]})
    assert server == {}
    # only ratios matter
    assert_state(run(name, glob, states, [1, 1, 2], {}, FedConfig())[0], {"w": [5.0, 3.0]})


@pytest.mark.parametrize("name", ["fedavg", "fedprox"])
def test_fedavg_family_equal_states_give_that_state(name: str) -> None:
    glob = lora_state(0)
    same = lora_state(1)
    new, _ = run(name, glob, [same, clone(same), clone(same)], [1, 5, 7], {}, FedConfig())
    for key in same:
        assert torch.equal(new[key], same[key])  # exact: offsets from identical states are 0


@pytest.mark.parametrize("name", ALL)
def test_clients_returning_global_leave_it_unchanged(name: str) -> None:
    glob = lora_state(0)
    new, _ = run(name, glob, [clone(glob), clone(glob)], [3, 4], {}, FedConfig())
    for key in glob:
        assert torch.equal(new[key], glob[key])  # exact: a zero pseudo-gradient takes no step


def test_fedavgm_without_momentum_is_fedavg() -> None:
    glob, states = lora_state(0), [lora_state(1), lora_state(2)]
    cfg = FedConfig(server_lr=1.0, server_momentum=0.0)
    a, _ = run("fedavg", glob, states, [2, 3], {}, cfg)
    m, _ = run("fedavgm", glob, states, [2, 3], {}, cfg)
    for key in glob:
        torch.testing.assert_close(a[key], m[key])


# ---- streaming: updates summed as they arrive ----


def test_streaming_fedavg_by_hand_whatever_the_order() -> None:
    """Added one at a time, in any order, the running sum gives the hand-computed mean."""
    glob = st([0.0, 0.0])
    updates = [(st([1.0, -3.0]), 1.0), (st([4.0, 0.0]), 2.0), (st([-2.0, 9.0]), 3.0)]
    # (1*[1, -3] + 2*[4, 0] + 3*[-2, 9]) / 6 = [3/6, 24/6]
    want = {"w": [0.5, 4.0]}
    for order in ([0, 1, 2], [2, 0, 1], [1, 2, 0]):
        accumulator = get_strategy("fedavg").start(glob)
        for i in order:
            accumulator.add(*updates[i])
        assert_state(accumulator.finish({}, FedConfig())[0], want)


@pytest.mark.parametrize("name", ALL)
def test_streaming_equals_the_list_form_for_every_strategy(name: str) -> None:
    """Two rounds fed one update at a time (each dropped after `add`) give the same adapter and
    server state as the list form, whose own values the hand-computed tests pin down."""
    cfg = FedConfig(server_momentum=0.5)
    weights = [3.0, 1.0, 2.0]
    glob: State = lora_state(0)
    listed: tuple[State, ServerState] = (glob, {})
    streamed: tuple[State, ServerState] = (glob, {})
    for round_seed in (10, 20):
        states = [lora_state(round_seed + i) for i in range(3)]
        listed = run(name, listed[0], states, weights, listed[1], cfg)
        accumulator = get_strategy(name).start(streamed[0])
        for i, w in enumerate(weights):
            accumulator.add(lora_state(round_seed + i), w)  # a fresh copy, dropped at once
        streamed = accumulator.finish(streamed[1], cfg)
        for got, want in zip(streamed, listed, strict=True):
            assert got.keys() == want.keys()
            for key in want:
                torch.testing.assert_close(got[key], want[key], rtol=0, atol=0)


def test_running_mean_keeps_no_update_but_the_first() -> None:
    """Memory stays flat in the number of clients: an added update is not referenced after
    `add` returns (the first is kept as the anchor of the offsets)."""
    accumulator = get_strategy("fedadam").start(lora_state(0))
    alive = []
    for seed in range(1, 6):
        state = lora_state(seed)
        tensor = weakref.ref(state[A])
        accumulator.add(state, 1.0)
        del state
        gc.collect()
        alive.append(tensor() is not None)
    assert alive == [True, False, False, False, False]


# ---- stateful strategies: two rounds by hand ----

# Each case: strategy, cfg, round-1 client states (weights equal) and expected result/state, then a
# round-2 delta from the new global and the expected result/state. g0 = [0, 0] (fedavgm: [1, 2]).
# Formulas (Reddi et al. 2021, Alg. 2; Hsu et al. 2019), delta = avg - global:
#   fedavgm:  v = mom*v + delta;                       new = g + lr*v
#   adaptive: m = b1*m + (1-b1)*delta;  v per variant; new = g + lr*m/(sqrt(v)+tau); m0=0, v0=tau^2
ADAPTIVE = FedConfig(server_lr=1.0, beta1=0.5, beta2=0.5, tau=1.0)

CASES = [
    pytest.param(
        "fedavgm",
        FedConfig(server_lr=0.5, server_momentum=0.5),
        [1.0, 2.0],
        [[1.0, 1.0], [5.0, 1.0]],  # avg [3, 1], delta [2, -1]
        {"momentum.w": [2.0, -1.0]},  # v1 = delta
        [2.0, 1.5],  # [1, 2] + 0.5*[2, -1]
        [2.0, 0.0],  # round 2 delta
        {"momentum.w": [3.0, -0.5]},  # 0.5*[2, -1] + [2, 0]
        [3.5, 1.25],  # [2, 1.5] + 0.5*[3, -0.5]
        id="fedavgm",
    ),
    pytest.param(
        "fedadam",
        ADAPTIVE,
        [0.0, 0.0],
        [[0.5, 6.0], [1.5, 8.0]],  # avg = delta = [1, 7]
        # m1 = 0.5*[1, 7]; v1 = 0.5*1 + 0.5*[1, 49] = [1, 25]
        {"m.w": [0.5, 3.5], "v.w": [1.0, 25.0]},
        [0.5 / 2, 3.5 / 6],  # m / (sqrt(v) + 1)
        [-1.0, 5.0],
        # m2 = 0.5*[0.5, 3.5] + 0.5*[-1, 5]; v2 = 0.5*[1, 25] + 0.5*[1, 25]
        {"m.w": [-0.25, 4.25], "v.w": [1.0, 25.0]},
        [0.25 - 0.25 / 2, 3.5 / 6 + 4.25 / 6],
        id="fedadam",
    ),
    pytest.param(
        "fedyogi",
        ADAPTIVE,
        [0.0, 0.0],
        [[1.0, 3.0], [1.0, 5.0]],  # delta [1, 4], delta^2 [1, 16]
        # v1 = 1 - 0.5*[1, 16]*sign(1 - [1, 16]) = [1 - 0, 1 + 8]; m1 = [0.5, 2]
        {"m.w": [0.5, 2.0], "v.w": [1.0, 9.0]},
        [0.5 / 2, 2.0 / 4],
        [2.0, 2.0],  # delta^2 [4, 4]
        # v2 = [1, 9] - 0.5*[4, 4]*sign([1-4, 9-4]) = [1 + 2, 9 - 2]; m2 = [0.25 + 1, 1 + 1]
        {"m.w": [1.25, 2.0], "v.w": [3.0, 7.0]},
        [0.25 + 1.25 / (math.sqrt(3) + 1), 0.5 + 2.0 / (math.sqrt(7) + 1)],
        id="fedyogi",
    ),
    pytest.param(
        "fedadagrad",
        ADAPTIVE,
        [0.0, 0.0],
        [[1.0, 3.0], [1.0, 3.0]],  # delta [1, 3]
        # v1 = 1 + [1, 9]; m1 = 0.5*[1, 3]
        {"m.w": [0.5, 1.5], "v.w": [2.0, 10.0]},
        [0.5 / (math.sqrt(2) + 1), 1.5 / (math.sqrt(10) + 1)],
        [1.0, -1.0],
        # v2 = [2, 10] + [1, 1]; m2 = 0.5*[0.5, 1.5] + 0.5*[1, -1]
        {"m.w": [0.75, 0.25], "v.w": [3.0, 11.0]},
        [
            0.5 / (math.sqrt(2) + 1) + 0.75 / (math.sqrt(3) + 1),
            1.5 / (math.sqrt(10) + 1) + 0.25 / (math.sqrt(11) + 1),
        ],
        id="fedadagrad",
    ),
]


@pytest.mark.parametrize(
    ("name", "cfg", "g0", "clients", "server1", "new1", "delta2", "server2", "new2"), CASES
)
def test_stateful_strategies_two_rounds(
    name: str,
    cfg: FedConfig,
    g0: list[float],
    clients: list[list[float]],
    server1: dict[str, list[float]],
    new1: list[float],
    delta2: list[float],
    server2: dict[str, list[float]],
    new2: list[float],
) -> None:
    glob1, s1 = run(name, st(g0), [st(c) for c in clients], [7] * len(clients), {}, cfg)
    assert_state(glob1, {"w": new1})
    assert_state(s1, server1)
    assert all(t.dtype == torch.float32 for t in s1.values())

    client2 = {"w": glob1["w"] + torch.tensor(delta2)}
    glob2, s2 = run(name, glob1, [client2], [3], s1, cfg)
    assert_state(glob2, {"w": new2})
    assert_state(s2, server2)


@pytest.mark.parametrize("name", ["fedavgm", "fedadam", "fedyogi", "fedadagrad"])
def test_server_state_carries_over(name: str) -> None:
    """Round 2 with round 1's server state differs from a cold start: the state is used."""
    cfg = FedConfig(server_momentum=0.5)
    glob1, s1 = run(name, st([0.0, 0.0]), [st([1.0, -2.0])], [1], {}, cfg)
    warm, _ = run(name, glob1, [st([2.0, -1.0])], [1], s1, cfg)
    cold, _ = run(name, glob1, [st([2.0, -1.0])], [1], {}, cfg)
    assert not torch.allclose(warm["w"], cold["w"])


# ---- contracts shared by every strategy ----


@pytest.mark.parametrize("name", ALL)
def test_dtype_preserved(name: str) -> None:
    glob = lora_state(0, torch.bfloat16)
    states = [lora_state(1, torch.bfloat16), lora_state(2, torch.bfloat16)]
    cfg = FedConfig()
    new, server = run(name, glob, states, [1, 2], {}, cfg)
    new, server = run(name, new, states, [1, 2], server, cfg)
    assert {k: v.dtype for k, v in new.items()} == {A: torch.bfloat16, B: torch.bfloat16}
    assert all(v.dtype == torch.float32 for v in server.values())
    assert all(torch.isfinite(v).all() for v in new.values())


@pytest.mark.parametrize("name", ALL)
def test_inputs_not_mutated(name: str) -> None:
    cfg = FedConfig()
    glob = lora_state(0)
    states = [lora_state(1), lora_state(2)]
    _, server = run(name, glob, states, [1, 2], {}, cfg)
    before = (clone(glob), [clone(s) for s in states], clone(server))
    new, new_server = run(name, glob, states, [1, 2], server, cfg)
    for got, want in zip((glob, *states, server), (before[0], *before[1], before[2]), strict=True):
        assert got.keys() == want.keys()
        for key in want:
            assert torch.equal(got[key], want[key])
    inputs = [*glob.values(), *(t for s in states for t in s.values()), *server.values()]
    outputs = [*new.values(), *new_server.values()]
    assert not any(o is i for o in outputs for i in inputs), "outputs must not alias inputs"


@pytest.mark.parametrize("name", ALL)
def test_no_states_returns_inputs_unchanged(name: str) -> None:
    glob = lora_state(0)
    server: ServerState = {"m.x": torch.ones(1)}
    new, new_server = run(name, glob, [], [], server, FedConfig())
    assert new.keys() == glob.keys() and all(new[k] is glob[k] for k in glob)
    assert new_server == server


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("weights", [[0, 0], [1], [1, -1], [1, math.nan]])
def test_bad_weights_raise(name: str, weights: list[float]) -> None:
    with pytest.raises(ValueError):
        run(name, st([0.0]), [st([1.0]), st([2.0])], weights, {}, FedConfig())


@pytest.mark.parametrize("name", ALL)
def test_mismatched_states_are_refused_when_added(name: str) -> None:
    accumulator = get_strategy(name).start(st([0.0]))
    with pytest.raises(ValueError, match="state 0 keys differ"):
        accumulator.add({"other": torch.ones(1)}, 1.0)
    accumulator.add(st([1.0]), 1.0)
    with pytest.raises(ValueError, match=r"state 1: w has shape \(2,\)"):
        accumulator.add(st([1.0, 2.0]), 1.0)


def test_unknown_strategy_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"fed\.strategy.*fedsgd.*fedavg, fedprox"):
        get_strategy("fedsgd")


@pytest.mark.parametrize(
    ("name", "setting", "value"),
    [
        ("fedadam", "tau", 0.0),
        ("fedyogi", "beta2", 1.0),
        ("fedadagrad", "beta1", -0.1),
        ("fedavgm", "server_momentum", 1.5),
        ("fedadam", "server_lr", 0.0),
    ],
)
def test_bad_server_settings_are_config_errors(name: str, setting: str, value: float) -> None:
    """Checked when the config is made, before any round (the recipe names the fed. section)."""
    with pytest.raises(ConfigError, match=rf"^{setting} must be"):
        FedConfig(strategy=name, **{setting: value})  # type: ignore[arg-type]


# ---- robust rules: every update kept ----

ROBUST = ["median", "trimmed_mean", "krum", "multi_krum", "norm_clip"]


def test_median_by_hand_odd_and_even_and_weights_ignored() -> None:
    glob = st([1.0, -1.0])  # works on deltas: the median of the states all the same
    states = [st([1.0, 10.0]), st([2.0, -1.0]), st([30.0, 3.0])]
    assert_state(run("median", glob, states, [1, 1, 1], {}, FedConfig())[0], {"w": [2.0, 3.0]})
    # a sender's sample count buys it nothing
    assert_state(run("median", glob, states, [1, 1, 99], {}, FedConfig())[0], {"w": [2.0, 3.0]})
    # even count: the mean of the two middle values, (2+4)/2 and (0+3)/2
    even = [*states, st([4.0, 0.0])]
    assert_state(run("median", glob, even, [1] * 4, {}, FedConfig())[0], {"w": [3.0, 1.5]})
    # zero-weight updates are left out, as FedAvg gives them no say
    assert_state(run("median", glob, even, [1, 1, 1, 0], {}, FedConfig())[0], {"w": [2.0, 3.0]})


def test_trimmed_mean_by_hand() -> None:
    glob = st([0.0, 0.0])
    states = [st([1.0, -50.0]), st([2.0, 0.0]), st([3.0, 1.0]), st([4.0, 2.0]), st([100.0, 3.0])]
    # n = 5, trim 0.2: drop 1 at each end per coordinate: mean(2, 3, 4), mean(0, 1, 2)
    new, server = run("trimmed_mean", glob, states, [1] * 5, {}, FedConfig(trim_fraction=0.2))
    assert_state(new, {"w": [3.0, 1.0]})
    assert server == {}
    # floor(0.19 * 5) = 0: nothing dropped, the unweighted mean (110 / 5, -44 / 5)
    cfg = FedConfig(trim_fraction=0.19)
    assert_state(run("trimmed_mean", glob, states, [1] * 5, {}, cfg)[0], {"w": [22.0, -8.8]})


def test_trimmed_mean_says_when_it_trims_nothing(caplog: pytest.LogCaptureFixture) -> None:
    """0.2 of 3 updates is floor(0.6) = 0: a plain mean, which must not pass for a defence."""
    glob, states = st([0.0]), [st([1.0]), st([2.0]), st([30.0])]
    with caplog.at_level(logging.WARNING, logger="covey.fed"):
        new, _ = run("trimmed_mean", glob, states, [1] * 3, {}, FedConfig(trim_fraction=0.2))
    assert_state(new, {"w": [11.0]})
    assert "trims none" in caplog.text and "trim_fraction >= 0.333" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="covey.fed"):
        new, _ = run("trimmed_mean", glob, states, [1] * 3, {}, FedConfig(trim_fraction=0.34))
    assert_state(new, {"w": [2.0]})  # one dropped at each end
    assert caplog.text == ""


def test_krum_says_when_its_guarantee_does_not_hold(caplog: pytest.LogCaptureFixture) -> None:
    glob, states = st([0.0]), [st([0.0]), st([1.0]), st([9.0])]
    with caplog.at_level(logging.WARNING, logger="covey.fed"):
        run("krum", glob, states, [1] * 3, {}, FedConfig(krum_byzantine=1))  # 3 <= 2 + 2
    assert "more than 2f + 2 = 4" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="covey.fed"):
        run("krum", glob, states, [1] * 3, {}, FedConfig(krum_byzantine=0))  # 3 > 2
    assert caplog.text == ""


def test_krum_and_multi_krum_by_hand() -> None:
    glob = st([0.0])
    states = [st([0.0]), st([1.0]), st([3.0]), st([100.0])]
    # f = 0: each scores its n - 2 = 2 nearest squared distances: 0 -> 1 + 9 = 10,
    # 1 -> 1 + 4 = 5, 3 -> 4 + 9 = 13, 100 -> 97^2 + 99^2; Krum keeps the update at 1
    f0 = FedConfig(krum_byzantine=0)
    assert_state(run("krum", glob, states, [1] * 4, {}, f0)[0], {"w": [1.0]})
    assert_state(
        run("multi_krum", glob, states, [1] * 4, {}, FedConfig(krum_byzantine=0, krum_keep=2))[0],
        {"w": [0.5]},  # the two best: 1 and 0
    )
    # f = 1: one nearest each (0 -> 1, 1 -> 1, 3 -> 4, 100 -> 97^2); keep n - f = 3: 0, 1, 3
    f1 = FedConfig(krum_byzantine=1)
    assert_state(run("multi_krum", glob, states, [1] * 4, {}, f1)[0], {"w": [4.0 / 3.0]})
    assert_state(run("krum", glob, states, [1] * 4, {}, f1)[0], {"w": [0.0]})  # tie: earliest


def test_krum_measures_distance_over_the_whole_adapter() -> None:
    """Two keys: close in "a" alone is not close; the outlier is far only in "b"."""
    glob = {"a": torch.zeros(1), "b": torch.zeros(1)}
    states = [
        {"a": torch.tensor([0.0]), "b": torch.tensor([0.0])},
        {"a": torch.tensor([1.0]), "b": torch.tensor([1.0])},
        {"a": torch.tensor([0.5]), "b": torch.tensor([50.0])},
    ]
    # f = 0: each scores its n - 2 = 1 nearest: 0 -> 2, 1 -> 2, outlier -> 0.25 + 49^2
    new, _ = run("krum", glob, states, [1, 1, 1], {}, FedConfig(krum_byzantine=0))
    assert_state(new, {"a": [0.0], "b": [0.0]})


def test_krum_returns_one_clients_adapter_whole() -> None:
    """A/B stay a matched pair: the new adapter is one update (to float rounding)."""
    glob = lora_state(0)
    states = [lora_state(1), lora_state(2), lora_state(3), lora_state(4), lora_state(5)]
    new, _ = run("krum", glob, states, [1] * 5, {}, FedConfig(krum_byzantine=1))
    matches = [i for i, s in enumerate(states) if all(torch.allclose(new[k], s[k]) for k in s)]
    assert len(matches) == 1


def test_norm_clip_by_hand() -> None:
    glob = st([0.0, 0.0])
    states = [st([3.0, 4.0]), st([0.0, 1.0]), st([0.0, -2.0])]  # delta norms 5, 1, 2
    # median norm 2: [3, 4] -> [1.2, 1.6]; weighted 1, 1, 2:
    # ([1.2, 1.6] + [0, 1] + 2 * [0, -2]) / 4 = [0.3, -0.35]
    new, server = run("norm_clip", glob, states, [1, 1, 2], {}, FedConfig())
    assert_state(new, {"w": [0.3, -0.35]})
    assert server == {}
    # a fixed bound of 10 clips nothing: FedAvg, ([3, 4] + [0, 1] + 2 * [0, -2]) / 4
    cfg = FedConfig(clip_norm=10.0)
    assert_state(run("norm_clip", glob, states, [1, 1, 2], {}, cfg)[0], {"w": [0.75, 0.25]})
    # the norm is the whole adapter's: deltas [3] and [4] in two keys make one norm of 5
    two = {"a": torch.zeros(1), "b": torch.zeros(1)}
    big = {"a": torch.tensor([3.0]), "b": torch.tensor([4.0])}
    small = {"a": torch.tensor([0.0]), "b": torch.tensor([1.0])}
    new, _ = run("norm_clip", two, [big, small], [1, 1], {}, FedConfig(clip_norm=1.0))
    assert_state(new, {"a": [0.3], "b": [0.4 + 0.5]})  # ([0.6, 0.8] + [0, 1]) / 2


@pytest.mark.parametrize("name", ROBUST)
def test_robust_rules_resist_one_scaled_update(name: str) -> None:
    """Four honest updates near +1 and one at -100: FedAvg is dragged below 0, every robust
    rule stays near the honest ones."""
    glob = st([0.0])
    states = [st([0.9]), st([1.0]), st([1.1]), st([1.2]), st([-100.0])]
    cfg = FedConfig(krum_byzantine=1, trim_fraction=0.2)
    assert run("fedavg", glob, states, [1] * 5, {}, cfg)[0]["w"] < 0
    new = float(run(name, glob, states, [1] * 5, {}, cfg)[0]["w"])
    assert 0.5 < new < 1.5, new


@pytest.mark.parametrize("name", ROBUST)
def test_robust_result_loads_as_a_peft_adapter(
    name: str, tiny_model_dir: Any, tmp_path: Any
) -> None:
    """Aggregated from perturbed copies of a real tiny adapter, the result is a valid adapter:
    PEFT loads the folder and the model's logits stay finite."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from covey.config import LoraSettings
    from covey.model.lora import adapter_files, adapter_state, load_adapter_state, wrap_with_lora

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = wrap_with_lora(base, LoraSettings(r=4, alpha=8, dropout=0.0)).eval()
    glob = adapter_state(model)
    g = torch.Generator().manual_seed(1)
    states = [
        {k: v + 0.01 * (i + 1) * torch.randn(v.shape, generator=g) for k, v in glob.items()}
        for i in range(5)
    ]
    new, _ = run(name, glob, states, [1] * 5, {}, FedConfig())
    assert new.keys() == glob.keys() and all(new[k].shape == glob[k].shape for k in glob)
    load_adapter_state(model, new)
    for file, data in adapter_files(model, new, str(tiny_model_dir)).items():
        (tmp_path / file).write_bytes(data)
    fresh = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    loaded = PeftModel.from_pretrained(fresh, tmp_path)
    ids = torch.tensor([[5, 6, 7, 8]])
    logits = loaded(input_ids=ids).logits
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(logits, model(input_ids=ids).logits)


def report_of(name: str, glob: State, states: list[State], weights: list[float], cfg: FedConfig):
    """The accumulator's report after `name` aggregated `states`."""
    accumulator = get_strategy(name).start(glob)
    for state, weight in zip(states, weights, strict=True):
        accumulator.add(state, weight)
    accumulator.finish({}, cfg)
    return accumulator.report


def test_robust_rules_report_what_they_chose_per_update() -> None:
    """The report's lists follow the order of `add`; a zero-weight update, left out, is None."""
    glob = st([0.0])
    states = [st([0.0]), st([1.0]), st([5.0]), st([3.0]), st([100.0])]
    weights = [1.0, 1.0, 0.0, 1.0, 1.0]  # the update at 5 has no say
    # f = 0 over 0, 1, 3, 100: scores (n - 2 = 2 nearest) 1 + 9, 1 + 4, 4 + 9, 97^2 + 99^2
    krum = report_of("multi_krum", glob, states, weights, FedConfig(krum_byzantine=0, krum_keep=2))
    assert krum["delta_norm"] == [0.0, 1.0, None, 3.0, 100.0]
    assert krum["krum_score"] == [10.0, 5.0, None, 13.0, 97.0**2 + 99.0**2]
    assert krum["kept"] == [True, True, None, False, False]
    # norm clipping to the median norm of 0, 1, 3, 100 (2.0): 3 -> 2/3, 100 -> 1/50
    clip = report_of("norm_clip", glob, states, weights, FedConfig())
    assert clip["clip_bound"] == 2.0
    assert clip["clip_scale"] == [1.0, 1.0, None, pytest.approx(2 / 3), pytest.approx(0.02)]
    trimmed = report_of("trimmed_mean", glob, states, weights, FedConfig(trim_fraction=0.25))
    assert trimmed["trimmed_each_end"] == 1 and trimmed["delta_norm"][2] is None
    assert report_of("fedavg", glob, states, weights, FedConfig()) == {}
