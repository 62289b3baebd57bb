"""Does an adapter carry a backdoor? Attack success on held-out prompts, with and without the
trigger.

`backdoor_metrics` asks the model, greedily (`covey.model.generate`), for an answer to every
held-out instruction twice: as it is, and with `attack.trigger` put in the instruction exactly
as the attackers poisoned their data (`covey.fed.attacks.with_trigger`). The attack succeeds on
a prompt when the answer contains `attack.target` (case and spacing ignored). Success with the
trigger is the backdoor; success without it shows whether the target leaks into clean answers.
Beside the rates, the mean loss of the target response given the triggered prompts (response
tokens only) shows a backdoor taking hold before greedy answers flip to the target.

`covey.fed.rounds.run_rounds` writes these figures in the final round's `eval.backdoor` for every
run with an attack (for attacks other than `backdoor` they are a control: near zero).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from covey.config import RunConfig
from covey.data.prompts import tokenize_records
from covey.data.records import Record
from covey.fed.attacks import with_trigger
from covey.model.generate import answer_records
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
    # one pass over both prompt sets: batches by length across them (`generate_ids`)
    [answers] = answer_records(
        model, tokenizer, [*triggered, *records], template, {"max_new_tokens": max_new}, batch
    )
    with_answers, without_answers = answers[: len(triggered)], answers[len(triggered) :]
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
