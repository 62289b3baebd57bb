"""The local trainer on a tiny Llama: it learns, it is seeded, and its batching is exact."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from covey.config import LoraSettings, ModelConfig, PromptConfig, TrainConfig
from covey.data.prompts import tokenize_records
from covey.data.records import load_records
from covey.errors import ConfigError
from covey.model.loading import load_base_model
from covey.model.lora import adapter_state, wrap_with_lora
from covey.train.evaluate import evaluate_loss
from covey.train.local import lr_at, plan_steps, train_local


@pytest.fixture(scope="module")
def setup(tiny_model_dir: Path, client_data_dir: Path) -> tuple[Any, Any, list, dict]:
    model, tokenizer = load_base_model(ModelConfig(base=str(tiny_model_dir)))
    torch.manual_seed(0)
    peft = wrap_with_lora(model, LoraSettings(r=4, alpha=8, dropout=0.0))
    records = load_records(client_data_dir / "client_0.jsonl").records
    examples = tokenize_records(records, tokenizer, PromptConfig(cutoff_len=64))
    return peft, tokenizer, examples, adapter_state(peft)


CFG = TrainConfig(epochs=4, batch_size=8, micro_batch_size=4, lr=3e-2, max_grad_norm=1.0)


def test_training_lowers_the_loss(setup: tuple) -> None:
    model, tokenizer, examples, start = setup
    result = train_local(model, examples, start, CFG, seed=1, pad_id=tokenizer.pad_token_id)
    from covey.model.lora import load_adapter_state

    load_adapter_state(model, start)
    before = evaluate_loss(model, examples, 8, tokenizer.pad_token_id)["loss"]
    load_adapter_state(model, result.state)
    after = evaluate_loss(model, examples, 8, tokenizer.pad_token_id)["loss"]
    assert after < before - 0.05  # a random 2-layer model with rank-4 q/v LoRA learns slowly
    assert result.num_samples == len(examples)
    assert result.metrics["steps"] == len(
        plan_steps([1] * len(examples), CFG, np.random.default_rng(0))
    )
    # every example seen `epochs` times; padding is not counted
    assert result.metrics["tokens"] == CFG.epochs * sum(len(e.input_ids) for e in examples)
    assert result.metrics["tokens_per_s"] > 0
    assert set(result.state) == set(start)


def test_same_seed_same_adapter_other_seed_other(setup: tuple) -> None:
    model, tokenizer, examples, start = setup
    cfg = replace(CFG, epochs=1)
    a = train_local(model, examples, start, cfg, seed=3, pad_id=tokenizer.pad_token_id).state
    b = train_local(model, examples, start, cfg, seed=3, pad_id=tokenizer.pad_token_id).state
    c = train_local(model, examples, start, cfg, seed=4, pad_id=tokenizer.pad_token_id).state
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


STOCK = {"packed": False, "targets_only": False}
"""The stock computation: padded rows, output layer and loss at every position."""


@pytest.mark.parametrize(
    ("variant", "path"),
    [
        ({"micro_batch_size": 2}, STOCK),
        ({"micro_batch_size": 8}, STOCK),
        ({"group_by_length": False}, STOCK),
        ({}, {"packed": True, "targets_only": False}),
        ({}, {"packed": False, "targets_only": True}),
        ({}, {}),  # the device's default: packed here, target positions only
        ({"micro_batch_size": 2, "group_by_length": False}, {}),
    ],
    ids=["micro2", "micro8", "ungrouped", "packed", "targets-only", "default", "default-micro2"],
)
def test_batching_does_not_change_what_a_step_learns(
    setup: tuple, variant: dict, path: dict
) -> None:
    """Accumulation, length grouping, packing and the target-only output layer change compute
    and memory, not the gradient: two steps end at the stock computation's adapter."""
    model, tokenizer, examples, start = setup
    cfg = replace(CFG, epochs=1, max_steps=2)
    pad = tokenizer.pad_token_id
    reference = train_local(model, examples, start, cfg, seed=5, pad_id=pad, **STOCK)
    other = train_local(model, examples, start, replace(cfg, **variant), seed=5, pad_id=pad, **path)
    assert other.metrics["train_loss"] == pytest.approx(reference.metrics["train_loss"], rel=1e-5)
    assert other.metrics["tokens"] == reference.metrics["tokens"]  # real tokens, never padding
    for key in reference.state:
        torch.testing.assert_close(other.state[key], reference.state[key], rtol=1e-4, atol=1e-5)


def test_fedprox_term_keeps_the_adapter_closer_to_the_start(setup: tuple) -> None:
    model, tokenizer, examples, start = setup

    def distance(mu: float) -> float:
        cfg = replace(CFG, prox_mu=mu, max_grad_norm=0.0)
        state = train_local(
            model, examples, start, cfg, seed=2, pad_id=tokenizer.pad_token_id
        ).state
        return sum(float((state[k] - start[k]).norm() ** 2) for k in start) ** 0.5

    assert distance(50.0) < 0.9 * distance(0.0)


def test_plan_steps_epochs_and_cap() -> None:
    lengths = list(range(10))
    rng = np.random.default_rng(0)
    steps = plan_steps(lengths, TrainConfig(epochs=2.5, batch_size=4, micro_batch_size=2), rng)
    flat = [i for step in steps for mb in step for i in mb]
    assert len(flat) == 25 and len(steps) == 7 and all(len(mb) <= 2 for s in steps for mb in s)
    assert sorted(Counter(flat).values()) == [2] * 5 + [3] * 5  # 2.5 passes
    assert sorted(flat[:8]) == sorted(set(flat[:8]))  # no repeats within the first epoch
    capped = plan_steps(lengths, TrainConfig(batch_size=4, micro_batch_size=2, max_steps=2), rng)
    assert len(capped) == 2
    grouped = plan_steps(lengths, TrainConfig(batch_size=4, micro_batch_size=4), rng)
    assert all(mb == sorted(mb, key=lambda i: -lengths[i]) for s in grouped for mb in s)


def test_bad_train_settings() -> None:
    """Refused when the config is made, before any step (a recipe adds the train. prefix)."""
    with pytest.raises(ConfigError, match=r"batch_size \(2\) must be >= train\.micro_batch_size"):
        TrainConfig(batch_size=2, micro_batch_size=4)
    with pytest.raises(ConfigError, match=r"epochs must be > 0"):
        TrainConfig(epochs=0)
    with pytest.raises(ConfigError, match=r"lr_schedule = 'exp' is not one of"):
        TrainConfig(lr_schedule="exp")  # type: ignore[arg-type]


def test_lr_schedules() -> None:
    warm = TrainConfig(lr=1.0, warmup_steps=2, lr_schedule="linear")
    assert [round(lr_at(s, 6, warm), 3) for s in range(6)] == [0.5, 1.0, 1.0, 0.75, 0.5, 0.25]
    cosine = TrainConfig(lr=1.0, lr_schedule="cosine")
    assert lr_at(0, 4, cosine) == 1.0 and abs(lr_at(2, 4, cosine) - 0.5) < 1e-9


def test_example_losses_are_per_example_in_order_and_agree_with_the_mean(setup: tuple) -> None:
    from covey.train.evaluate import example_losses

    model, tokenizer, examples, _ = setup
    pad = tokenizer.pad_token_id
    losses = example_losses(model, examples, 3, pad)
    assert losses.shape == (len(examples),) and not losses.isnan().any()
    # the order follows the input, whatever the batching (longest first inside)
    reversed_losses = example_losses(model, examples[::-1], 5, pad)
    torch.testing.assert_close(reversed_losses, losses.flip(0))
    # token-weighted, they give evaluate_loss's mean
    tokens = torch.tensor([sum(t != -100 for t in e.labels[1:]) for e in examples]).double()
    mean = float((losses * tokens).sum() / tokens.sum())
    assert mean == pytest.approx(evaluate_loss(model, examples, 4, pad)["loss"], rel=1e-5)
    # an example whose target was cut off entirely has no loss
    cut = replace(examples[0], labels=[-100] * len(examples[0].labels))
    assert example_losses(model, [cut, examples[1]], 2, pad)[0].isnan()
