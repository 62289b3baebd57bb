"""Evaluation on the held-out test set: response-only loss and perplexity, and sample answers."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from covey.data.prompts import Example, build_prompt
from covey.data.records import Record
from covey.train.loss import example_loss_sums
from covey.train.packing import make_batch, packs_by_default


@torch.no_grad()
def evaluate_loss(
    model: Any, examples: Sequence[Example], batch_size: int, pad_id: int
) -> dict[str, float]:
    """Token-weighted mean next-token loss over the examples' target tokens, and exp(loss).

    Evaluation examples are tokenized with the prompt masked, so this is the loss on the
    reference responses only, whatever `train_on_inputs` says for training.
    """
    sums, counts = _loss_sums(model, examples, batch_size, pad_id)
    tokens = int(counts.sum())
    loss = float(sums.sum()) / max(tokens, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": float(tokens)}


@torch.no_grad()
def example_losses(
    model: Any, examples: Sequence[Example], batch_size: int, pad_id: int
) -> torch.Tensor:
    """Each example's mean loss over its target tokens, in the examples' order (NaN for an
    example whose target was cut off entirely): for paired comparisons of two adapters."""
    sums, counts = _loss_sums(model, examples, batch_size, pad_id)
    return torch.where(counts > 0, sums / counts.clamp(min=1), torch.nan)


def _loss_sums(
    model: Any, examples: Sequence[Example], batch_size: int, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per example, in the examples' order: summed target-token loss (float64) and its token
    count. Batches are formed longest first to limit padding where they are not packed."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    sums = torch.zeros(len(examples), dtype=torch.float64)
    counts = torch.zeros(len(examples), dtype=torch.float64)
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids), reverse=True)
    packed = packs_by_default(model)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        batch = make_batch([examples[i] for i in rows], pad_id, device, packed)
        sums[rows], counts[rows] = example_loss_sums(model, batch, len(rows))
    model.train(was_training)
    return sums, counts


@torch.no_grad()
def generate_answers(
    model: Any,
    tokenizer: Any,
    records: Sequence[Record],
    template: str,
    max_new_tokens: int,
    batch_size: int = 8,
    decoding: dict[str, Any] | None = None,
) -> list[dict[str, str]]:
    """Answers to `records`' instructions, in their order: greedy unless `decoding` (extra
    `generate` arguments, e.g. a repetition penalty) says otherwise, so rounds compare fairly.

    Prompts are batched `batch_size` at a time, shortest first to limit padding, and padded on
    the left so that every row's answer starts at the same position. Greedy answers can differ
    in the last bits from one-at-a-time decoding (padding changes the shapes of the sums), but
    the same batch size always gives the same answers.
    """
    if not records:
        return []
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    prompts = [build_prompt(record, template, tokenizer) for record in records]
    special = template != "chat"  # chat templates hold their special tokens already
    lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=special)["input_ids"]]
    order = sorted(range(len(prompts)), key=lambda i: lengths[i])
    stop_ids = _stop_ids(model, tokenizer)
    texts = [""] * len(prompts)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            encoded = tokenizer(
                [prompts[i] for i in rows],
                return_tensors="pt",
                padding=True,
                add_special_tokens=special,
            ).to(device)
            output = model.generate(
                **encoded,
                max_new_tokens=max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
                **({"do_sample": False} | (decoding or {})),
            )
            width = encoded["input_ids"].shape[1]
            for i, answer in zip(rows, output[:, width:].tolist(), strict=True):
                ids = next((answer[:k] for k, t in enumerate(answer) if t in stop_ids), answer)
                texts[i] = tokenizer.decode(ids, skip_special_tokens=True).strip()
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return [
        {"instruction": record.instruction, "answer": text}
        for record, text in zip(records, texts, strict=True)
    ]


def _stop_ids(model: Any, tokenizer: Any) -> set[int]:
    """Tokens that end an answer: the generation config's end-of-sequence ids and the
    tokenizer's (a finished row is padded until the batch ends)."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids: set[int] = set(configured) if isinstance(configured, list) else set()
    if isinstance(configured, int):
        ids.add(configured)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids
