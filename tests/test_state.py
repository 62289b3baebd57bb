"""The adapter arithmetic in `covey.state`, on values worked out by hand."""

import math

import pytest
import torch

from covey.state import delta, flatten, norm


def test_delta_is_state_minus_base_over_the_base_keys_in_float32() -> None:
    base = {"b": torch.tensor([1.0, 2.0]), "a": torch.tensor([[0.5]])}
    state = {"a": torch.tensor([[2.0]]), "b": torch.tensor([1.5, 0.0]), "extra": torch.ones(1)}
    out = delta(state, base)
    assert list(out) == ["b", "a"]  # the base's keys, in its order; `extra` is not the base's
    assert out["b"].tolist() == [0.5, -2.0]
    assert out["a"].tolist() == [[1.5]]
    assert all(t.dtype == torch.float32 for t in out.values())


def test_delta_casts_before_subtracting() -> None:
    # 1 and 2^-9 are bf16s, their difference 0.998046875 needs 9 bits of mantissa, bf16 has 8:
    # subtracted in bf16 it would round (to 1.0), cast to float32 first it is exact
    base = {"w": torch.tensor([2.0**-9], dtype=torch.bfloat16)}
    state = {"w": torch.tensor([1.0], dtype=torch.bfloat16)}
    assert (state["w"] - base["w"]).item() != 1 - 2.0**-9
    assert delta(state, base)["w"].tolist() == [1 - 2.0**-9]
    wide = delta({"w": torch.tensor([1.0 + 2.0**-40], dtype=torch.float64)},
                 {"w": torch.tensor([1.0], dtype=torch.float64)}, torch.float64)  # fmt: skip
    assert wide["w"].dtype == torch.float64 and wide["w"].item() == 2.0**-40


def test_delta_lands_on_the_device_asked_for_and_misses_no_key() -> None:
    out = delta({"w": torch.ones(2)}, {"w": torch.zeros(2)}, torch.float64, device="cpu")
    assert out["w"].device.type == "cpu" and out["w"].dtype == torch.float64
    with pytest.raises(KeyError):
        delta({}, {"w": torch.zeros(1)})


def test_flatten_orders_keys_so_two_dicts_line_up() -> None:
    one = {"b": torch.tensor([[3.0, 4.0]]), "a": torch.tensor([1.0, 2.0])}
    other = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([[3.0, 4.0]])}
    assert flatten(one).tolist() == [1.0, 2.0, 3.0, 4.0]
    assert flatten(other).tolist() == [1.0, 2.0, 3.0, 4.0]
    assert flatten({}).tolist() == []


def test_norm_is_the_l2_norm_of_every_entry_together() -> None:
    # (3, 4) and (12): sqrt(9 + 16 + 144) = 13
    assert norm({"a": torch.tensor([3.0, 4.0]), "b": torch.tensor([[12.0]])}) == 13.0
    assert norm({}) == 0.0
    # summed in float64: 1e30 squared overflows float32, not the norm
    assert norm({"big": torch.tensor([1e30, 1e30])}) == pytest.approx(math.sqrt(2) * 1e30)


def test_norm_of_a_delta_is_the_distance() -> None:
    base = {"w": torch.tensor([1.0, 1.0]), "v": torch.tensor([0.0])}
    moved = {"w": torch.tensor([4.0, 1.0]), "v": torch.tensor([-4.0])}
    assert norm(delta(moved, base)) == 5.0
    assert flatten(delta(moved, base)).tolist() == [-4.0, 3.0, 0.0]  # v before w
