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
) -> list[dict[str, str]]:
    """Greedy answers to `records`' instructions (deterministic, so rounds compare fairly)."""
    device = next(model.parameters()).device
    model.eval()
    answers = []
    for record in records:
        prompt = build_prompt(record, template, tokenizer)
        encoded = tokenizer(prompt, return_tensors="pt", add_special_tokens=template != "chat")
        ids = encoded["input_ids"].to(device)
        output = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
        text = tokenizer.decode(output[0, ids.shape[1] :], skip_special_tokens=True).strip()
        answers.append({"instruction": record.instruction, "answer": text})
    return answers
