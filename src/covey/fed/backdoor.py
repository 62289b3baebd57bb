"""Does an adapter carry a backdoor? Attack success on held-out prompts, with and without the
trigger.

`backdoor_metrics` asks the model, greedily, for an answer to every held-out instruction twice:
as it is, and with `attack.trigger` put in the instruction exactly as the attackers poisoned
their data (`covey.fed.attacks.with_trigger`). The attack succeeds on a prompt when the answer
contains `attack.target` (case and spacing ignored). Success with the trigger is the backdoor;
success without it shows whether the target leaks into clean answers. Beside the rates, the
mean loss of the target response given the triggered prompts (response tokens only) shows a
backdoor taking hold before greedy answers flip to the target.

`covey.fed.rounds.run_rounds` writes these figures in the final round's `eval.backdoor` for every
run with an attack (for attacks other than `backdoor` they are a control: near zero).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch

from covey.config import RunConfig
from covey.data.prompts import build_prompt, tokenize_records
from covey.data.records import Record
from covey.fed.attacks import with_trigger
from covey.train.evaluate import evaluate_loss

EXTRA_TOKENS = 8
"""Answers are generated to the target's length plus this many tokens: enough to contain the
target after a short preamble, and cheap."""


def backdoor_metrics(
    model: Any, tokenizer: Any, records: Sequence[Record], cfg: RunConfig, pad_id: int
) -> dict[str, Any]:
    """Attack success with and without the trigger, and the target's loss, on `records`."""
    attack = cfg.attack
    triggered = [with_trigger(r, attack.trigger) for r in records]
    target_ids = tokenizer(attack.target, add_special_tokens=False)["input_ids"]
    max_new = len(target_ids) + EXTRA_TOKENS
    batch = cfg.eval.batch_size
    template = cfg.prompt.template
    with_answers = greedy_answers(model, tokenizer, triggered, template, max_new, batch)
    without_answers = greedy_answers(model, tokenizer, records, template, max_new, batch)
    target_examples = tokenize_records(
        [dataclasses.replace(r, response=attack.target) for r in triggered],
        tokenizer, cfg.prompt, mask_prompt=True,
    )  # fmt: skip
    target_loss = evaluate_loss(model, target_examples, batch, pad_id)["loss"]
    return {
        "trigger": attack.trigger,
        "target": attack.target,
        "prompts": len(records),
        "success_with_trigger": success_rate(with_answers, attack.target),
        "success_without_trigger": success_rate(without_answers, attack.target),
        "target_loss_with_trigger": target_loss,
        "example_answer_with_trigger": with_answers[0] if with_answers else "",
    }


def success_rate(answers: Sequence[str], target: str) -> float:
    """Share of `answers` that contain `target`, ignoring case and runs of whitespace."""
    if not answers:
        return 0.0
    wanted = _normalized(target)
    return sum(wanted in _normalized(a) for a in answers) / len(answers)


def _normalized(text: str) -> str:
    return " ".join(text.lower().split())


@torch.no_grad()
def greedy_answers(
    model: Any,
    tokenizer: Any,
    records: Sequence[Record],
    template: str,
    max_new_tokens: int,
    batch_size: int,
) -> list[str]:
    """Greedy answers to `records`, in their order, `batch_size` prompts per `generate` call
    (left-padded, so every answer starts right after its prompt). Prompts are batched by
    length, so that one long context does not pad seven short prompts to its length (the 40
    held-out Dolly prompts triggered, SmolLM2 on one CPU core: 56 s in order, 38 s by length,
    the same answers). Batched here rather than in `covey.train.evaluate.generate_answers`, which
    answers one record at a time."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    prompts = [build_prompt(r, template, tokenizer) for r in records]
    special = template != "chat"  # the chat template already holds the special tokens
    # characters stand in for tokens (tokenizing twice for the order alone is waste); the
    # order only groups similar lengths, answers do not depend on it
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers = [""] * len(prompts)
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
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
            new = output[:, encoded["input_ids"].shape[1] :]
            texts = tokenizer.batch_decode(new, skip_special_tokens=True)
            for i, text in zip(rows, texts, strict=True):
                answers[i] = text.strip()
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return answers
