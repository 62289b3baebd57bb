"""Local training on one client: a lean loop, no Trainer rebuilt every round.

`train_local` starts from the global adapter, runs AdamW over the client's tokenized examples
(micro-batches with gradient accumulation, warmup + schedule, clipping, optional FedProx term),
and returns the new adapter with the sample count and metrics. It is seeded per call, so the same
`(seed, data, start state)` gives the same result bit for bit on the same machine.

Batching: an optimizer step covers `batch_size` examples drawn in a seeded random order; with
`group_by_length`, the step's examples are sorted by length before being cut into micro-batches.
Each micro-batch is packed into one row where that is faster on the device (`covey.train.packing`),
else padded, and only its target positions reach the output layer (`covey.train.loss`). None of
this changes what a step learns: its gradient is the same sum over the same examples' target
tokens, however they are grouped, laid out or projected.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from covey.config import TrainConfig
from covey.data.prompts import Example
from covey.errors import ConfigError
from covey.model.lora import adapter_state, load_adapter_state
from covey.state import State
from covey.train.loss import summed_loss
from covey.train.packing import make_batch, packs_by_default

StepCallback = Callable[[int, int, int], None]
"""Called after each optimizer step with (step, total_steps, tokens_in_step)."""


@dataclass
class LocalResult:
    """What a client sends back: its adapter after training, and how it got there."""

    state: State
    num_samples: int
    metrics: dict[str, float] = field(default_factory=dict)


def plan_steps(
    lengths: Sequence[int], cfg: TrainConfig, rng: np.random.Generator
) -> list[list[list[int]]]:
    """Optimizer steps, each a list of micro-batches of example indices.

    `epochs` passes over the data (fractions allowed) in a fresh random order each pass, cut into
    steps of `batch_size` (the last one may be smaller), capped at `max_steps` when set.
    """
    if cfg.micro_batch_size < 1 or cfg.batch_size < cfg.micro_batch_size:
        raise ConfigError(
            f"train.batch_size ({cfg.batch_size}) must be >= train.micro_batch_size "
            f"({cfg.micro_batch_size}) >= 1"
        )
    if cfg.epochs <= 0:
        raise ConfigError(f"train.epochs must be > 0 (got {cfg.epochs})")
    n = len(lengths)
    total = max(1, round(n * cfg.epochs))
    order = np.concatenate([rng.permutation(n) for _ in range(math.ceil(total / n))])[:total]
    steps = [order[i : i + cfg.batch_size] for i in range(0, total, cfg.batch_size)]
    if cfg.max_steps > 0:
        steps = steps[: cfg.max_steps]
    planned = []
    for step in steps:
        indices = step.tolist()
        if cfg.group_by_length:
            indices.sort(key=lambda i: lengths[i], reverse=True)
        micro = cfg.micro_batch_size
        planned.append([indices[j : j + micro] for j in range(0, len(indices), micro)])
    return planned


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Linear warmup to `lr`, then constant, linear or cosine decay to zero at `total`."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    if cfg.lr_schedule == "linear":
        return cfg.lr * (1 - progress)
    if cfg.lr_schedule == "cosine":
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * progress))
    raise ConfigError(
        f"train.lr_schedule {cfg.lr_schedule!r} is unknown; use constant, linear or cosine"
    )


def train_local(
    model: Any,
    examples: Sequence[Example],
    start_state: State,
    cfg: TrainConfig,
    seed: int,
    pad_id: int,
    on_step: StepCallback | None = None,
    *,
    packed: bool | None = None,
    targets_only: bool = True,
) -> LocalResult:
    """Train the model's adapter from `start_state` on `examples`; return the new adapter.

    `packed` (default: `packs_by_default(model)`) and `targets_only` pick how a
    micro-batch is computed, never what it computes: benchmarks and tests set them to compare.
    """
    if not examples:
        raise ValueError("a client with no examples cannot train")
    device = next(model.parameters()).device
    packed = packs_by_default(model) if packed is None else packed
    load_adapter_state(model, start_state)
    torch.manual_seed(seed)  # LoRA dropout
    steps = plan_steps([len(e.input_ids) for e in examples], cfg, np.random.default_rng(seed))
    params = [p for p in model.parameters() if p.requires_grad]
    anchors = [p.detach().clone() for p in params] if cfg.prox_mu > 0 else []
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.train()

    loss_sum, target_tokens, seen_tokens = 0.0, 0, 0
    start = time.perf_counter()
    for step_index, micro_batches in enumerate(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step_index, len(steps), cfg)
        step_targets = sum(examples[i].num_target_tokens for mb in micro_batches for i in mb)
        step_tokens = 0
        optimizer.zero_grad(set_to_none=True)
        for micro in micro_batches:
            batch = make_batch([examples[i] for i in micro], pad_id, device, packed)
            summed = summed_loss(model, batch, targets_only)
            # normalise by the whole step's target tokens: accumulation then equals one big batch
            torch.autograd.backward(summed / max(step_targets, 1))
            loss_sum += summed.item()
            step_tokens += batch.tokens
        if anchors:
            proximal = sum(((p - a) ** 2).sum() for p, a in zip(params, anchors, strict=True))
            torch.autograd.backward(0.5 * cfg.prox_mu * proximal)
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        target_tokens += step_targets
        seen_tokens += step_tokens
        if on_step is not None:
            on_step(step_index + 1, len(steps), step_tokens)
    seconds = time.perf_counter() - start
    model.eval()
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_disable()
    return LocalResult(
        state=adapter_state(model),
        num_samples=len(examples),
        metrics={
            "train_loss": loss_sum / max(target_tokens, 1),
            "steps": float(len(steps)),
            "tokens": float(seen_tokens),
            "seconds": seconds,
            "tokens_per_s": seen_tokens / seconds if seconds > 0 else 0.0,
        },
    )
