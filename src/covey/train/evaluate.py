"""Evaluation on the held-out test set: response-only loss and perplexity, and sample answers."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from covey.data.prompts import Example, build_prompt
from covey.data.records import Record
from covey.train.local import iterate_batches, token_loss_sum


@torch.no_grad()
def evaluate_loss(
    model: Any, examples: Sequence[Example], batch_size: int, pad_id: int
) -> dict[str, float]:
    """Token-weighted mean next-token loss over the examples' target tokens, and exp(loss).

    Evaluation examples are tokenized with the prompt masked, so this is the loss on the
    reference responses only, whatever `train_on_inputs` says for training.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    for ids, mask, labels in iterate_batches(examples, batch_size, pad_id, device):
        total += token_loss_sum(model, ids, mask, labels).item()
        tokens += int((labels[:, 1:] != -100).sum())
    model.train(was_training)
    loss = total / max(tokens, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": float(tokens)}


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
