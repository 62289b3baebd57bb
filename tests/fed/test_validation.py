"""Update validation: every malformed or hostile update is rejected with a reason, never raised."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from covey.fed.validation import Verdict, validate_update
from covey.state import State

A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


def reference() -> State:
    return {A: torch.zeros(2, 3), B: torch.zeros(3, 2)}


def good_update() -> dict[str, torch.Tensor]:
    # distance from the zero reference: sqrt(6 * 1^2 + 6 * 0.5^2) = sqrt(7.5)
    return {A: torch.ones(2, 3), B: torch.full((3, 2), 0.5)}


def rejected(update: object, samples: object = 10, held: int = 100, bound: float = 0.0) -> Verdict:
    verdict = validate_update(update, reference(), samples, held, bound)
    assert not verdict.accepted
    assert verdict.reason
    assert verdict.num_samples == 0
    return verdict


def test_good_update_accepted() -> None:
    v = validate_update(good_update(), reference(), 10, 100, max_update_norm=5.0)
    assert v == Verdict(
        accepted=True, reason="", num_samples=10, update_norm=pytest.approx(math.sqrt(7.5))
    )
    assert not v.clamped


def test_inflated_sample_count_is_clamped() -> None:
    v = validate_update(good_update(), reference(), 10**9, 40)
    assert v.accepted and v.reason == ""
    assert v.num_samples == 40
    assert v.clamped


def test_numpy_integer_count_accepted() -> None:
    v = validate_update(good_update(), reference(), np.int64(7), 40)
    assert v.accepted and v.num_samples == 7 and isinstance(v.num_samples, int)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_rejected(bad: float) -> None:
    update = good_update()
    update[B][1, 0] = bad
    assert rejected(update).reason == f"non-finite values in {B}"


def test_non_finite_bf16_rejected() -> None:
    ref = {k: t.bfloat16() for k, t in reference().items()}
    update = {k: t.bfloat16() for k, t in good_update().items()}
    update[A][0, 0] = math.nan
    v = validate_update(update, ref, 5, 5)
    assert not v.accepted and A in v.reason


def test_wrong_shape_rejected() -> None:
    update = good_update()
    update[A] = torch.zeros(3, 2)
    reason = rejected(update).reason
    assert A in reason and "(3, 2)" in reason and "(2, 3)" in reason


def test_wrong_dtype_rejected() -> None:
    update = good_update()
    update[B] = update[B].double()
    reason = rejected(update).reason
    assert B in reason and "float64" in reason


def test_missing_key_rejected() -> None:
    update = good_update()
    del update[B]
    assert rejected(update).reason == f"1 missing key (e.g. {B})"


def test_extra_key_rejected() -> None:
    update = good_update()
    update["x.lora_A.weight"] = torch.zeros(1)
    update["y.lora_A.weight"] = torch.zeros(1)
    assert rejected(update).reason == "2 unexpected keys (e.g. x.lora_A.weight)"


def test_missing_and_extra_keys_both_named() -> None:
    update = good_update()
    update["other"] = update.pop(A)
    assert rejected(update).reason == f"1 missing key (e.g. {A}) and 1 unexpected key (e.g. other)"


@pytest.mark.parametrize("value", ["tensor", [1.0, 2.0], np.zeros((2, 3), np.float32), None])
def test_non_tensor_value_rejected(value: object) -> None:
    update: dict[str, object] = dict(good_update())
    update[A] = value
    reason = rejected(update).reason
    assert A in reason and "not a tensor" in reason


def test_non_string_key_rejected() -> None:
    update: dict[object, torch.Tensor] = dict(good_update())
    update[7] = torch.zeros(1)
    assert "non-string key" in rejected(update).reason


def test_meta_tensor_rejected() -> None:
    update = good_update()
    update[A] = torch.empty(2, 3, device="meta")
    assert A in rejected(update).reason


@pytest.mark.parametrize("update", [None, "state", [torch.zeros(1)], 42])
def test_not_a_dict_rejected(update: object) -> None:
    v = rejected(update)
    assert "not a dict" in v.reason
    assert math.isnan(v.update_norm)


def test_huge_norm_rejected_when_bounded() -> None:
    update = good_update()
    update[A] = torch.full((2, 3), 1e6)
    v = rejected(update, bound=10.0)
    assert "fed.max_update_norm" in v.reason
    assert v.update_norm > 1e6
    # the bound is off by default
    assert validate_update(update, reference(), 10, 100).accepted


def test_norm_is_distance_from_reference() -> None:
    ref = {A: torch.full((2, 3), 3.0), B: torch.full((3, 2), 3.0)}
    update = {A: torch.full((2, 3), 3.0), B: torch.full((3, 2), 5.0)}
    v = validate_update(update, ref, 1, 1, max_update_norm=math.sqrt(24))  # sqrt(6 * 2^2)
    assert v.accepted
    assert v.update_norm == pytest.approx(math.sqrt(24))


@pytest.mark.parametrize("samples", [0, -3, True, False, 2.0, 1.5, "10", None])
def test_bad_sample_counts_rejected(samples: object) -> None:
    v = rejected(good_update(), samples=samples)
    assert "sample count" in v.reason
    assert v.update_norm == pytest.approx(math.sqrt(7.5))  # structure was fine


def test_client_without_samples_rejected() -> None:
    assert "no samples" in rejected(good_update(), held=0).reason


def test_negative_held_samples_is_a_caller_bug() -> None:
    with pytest.raises(ValueError):
        validate_update(good_update(), reference(), 1, -1)


def test_inputs_not_mutated() -> None:
    update, ref = good_update(), reference()
    validate_update(update, ref, 3, 3, 100.0)
    assert all(torch.equal(update[k], good_update()[k]) for k in update)
    assert all(torch.equal(ref[k], reference()[k]) for k in ref)
