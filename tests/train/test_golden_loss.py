"""A golden loss: one tiny recipe's first training step, pinned to numbers.

The other training tests compare two ways of computing the same thing (packed vs padded,
targets-only vs full output layer, accumulation vs one big batch), so a change that moves both
sides alike passes them. These numbers catch that: a silent change in the math of a step moves
them by far more than the tolerance. Checked by breaking one thing at a time (December 2026):
prompts not masked moved every number by about 6e-2; LoRA alpha 8 -> 16 the losses after a step
by 2e-2 to 5e-2; LoRA's A drawn from another seed by 1e-3 to 6e-3; a per-micro-batch mean
instead of the step's token-weighted sum the reported losses by about 5 and the losses after by
2e-3 to 7e-3; packed rows whose positions do not restart per example (attention across
examples) by 5e-4 to 2e-3; one response changed by one character by 4e-5 to 3e-4. What they do
not see: AdamW moves each weight by about lr whatever the gradient's scale, so a constant
factor in the loss shows only in the reported losses, and gradient clipping (which acts here)
only if it goes grossly wrong (zeroed or non-finite gradients); turning it off moved the last
number by 3e-6.

The recipe: a 2-layer Llama built from `tests.model.tiny.tiny_config` with weights drawn from
a fixed torch generator in parameter-name order (so transformers' own init scheme does not
matter), the byte-level tokenizer with its ChatML template, six fixed records, LoRA r=4
alpha=8 on PEFT's default Llama modules (q_proj, v_proj) seeded with 0, prompts masked, one
optimizer step over all six records in two micro-batches (4 + 2), AdamW at lr 1e-2, gradients
clipped to norm 0.25 (they are 0.35 to 0.42 here, so clipping acts); and the same recipe in
two steps of three records (micro-batches 2 + 1), for the seeded order of the records and
AdamW's moments carried from one step to the next.

If a test here fails, something changed what a training step computes. Find out what and why;
only if the change is intended (and said so in its commit, with the old and new numbers),
regenerate the numbers with

    PYTHONPATH=src:. python -m tests.train.test_golden_loss

and paste the printed values below. Two runs, and one thread against two, agree to 2e-8
relative. A change of torch, transformers, PEFT or the CPU that moves them by less than
`TOLERANCE` is numerical noise; more than that is a change of math until shown otherwise.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
import torch

from covey.config import LoraSettings, PromptConfig, TrainConfig
from covey.data.prompts import IGNORE_INDEX, Example, tokenize_records
from covey.data.records import Record
from covey.model.lora import adapter_state, load_adapter_state, wrap_with_lora
from covey.state import State
from covey.train.evaluate import evaluate_loss
from covey.train.local import train_local

# The step's token-weighted loss on the response tokens, and the same examples' loss with the
# adapter that step made:
GOLDEN_FIRST_STEP_LOSS = 5.611318686573775
GOLDEN_LOSS_AFTER_STEP = 5.583687143227489
# A second recipe, two steps of three records: the loss the steps report, and the loss after them
GOLDEN_TWO_STEPS_LOSS = 5.604366027202802
GOLDEN_LOSS_AFTER_TWO_STEPS = 5.5485826472646185
# Relative. Noise is ~1e-7 relative here: Covey's loss and the plain one differ by 1e-7, one
# thread and two by 2e-8; the smallest change of math above moved a number by 6e-6.
TOLERANCE = 2e-6

RECORDS = [
    Record(instruction="Name a bird.", context="", response="A robin.", category="open_qa", id=0),
    Record(
        instruction="Summarize the text.",
        context="The cat sat on the mat all day.",
        response="A cat sat.",
        category="summarization",
        id=1,
    ),
    Record(instruction="Is 7 prime?", context="", response="Yes.", category="closed_qa", id=2),
    Record(
        instruction="Classify: apple, carrot.",
        context="",
        response="apple: fruit; carrot: vegetable",
        category="classification",
        id=3,
    ),
    Record(
        instruction="Say hi.", context="to Bob", response="Hi Bob!", category="general_qa", id=4
    ),
    Record(
        instruction="Write one line about the sea.",
        context="",
        response="The sea keeps its own time.",
        category="creative_writing",
        id=5,
    ),
]
PROMPT = PromptConfig(template="chat", train_on_inputs=False, cutoff_len=128)  # cuts nothing
LORA = LoraSettings(r=4, alpha=8, dropout=0.0)
ONE_STEP = TrainConfig(epochs=1, batch_size=6, micro_batch_size=4, lr=1e-2, max_grad_norm=0.25)
TWO_STEPS = replace(ONE_STEP, batch_size=3, micro_batch_size=2)  # micro-batches of 2 + 1
SEED = 0
Golden = tuple[Any, Any, list[Example], State]
"""The LoRA-wrapped model, its tokenizer, the tokenized records, the fresh adapter."""


def golden_setup() -> Golden:
    """The tiny model wrapped with a fresh LoRA adapter, its tokenizer, the tokenized records."""
    from transformers import LlamaForCausalLM

    from tests.model.tiny import make_tiny_tokenizer, tiny_config

    model = LlamaForCausalLM(tiny_config())
    weights = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for name, parameter in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):
                parameter.fill_(1.0)
            else:
                parameter.copy_(torch.randn(parameter.shape, generator=weights) * 0.05)
    torch.manual_seed(SEED)  # LoRA's A matrices
    peft = wrap_with_lora(model, LORA)
    tokenizer = make_tiny_tokenizer()
    return peft, tokenizer, tokenize_records(RECORDS, tokenizer, PROMPT), adapter_state(peft)


def plain_loss(model: Any, examples: list[Example]) -> float:
    """Token-weighted next-token cross-entropy on the response tokens, one example at a time,
    by plain PyTorch: what the golden numbers are, independent of Covey's loss code."""
    total, tokens = 0.0, 0
    with torch.no_grad():
        for example in examples:
            logits = model(input_ids=torch.tensor([example.input_ids])).logits[0, :-1]
            labels = torch.tensor(example.labels[1:])
            total += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
            tokens += int((labels != IGNORE_INDEX).sum())
    return total / tokens


def train_from_start(golden: Golden, cfg: TrainConfig, packed: bool) -> tuple[float, int, float]:
    """(the reported training loss, the steps taken, the plain loss after them), starting from
    the fresh adapter every time (the model is shared, so it is put back afterwards)."""
    model, tokenizer, examples, start = golden
    try:
        result = train_local(
            model, examples, start, cfg, seed=SEED, pad_id=tokenizer.pad_token_id, packed=packed
        )
        load_adapter_state(model, result.state)
        return (
            result.metrics["train_loss"],
            int(result.metrics["steps"]),
            plain_loss(model, examples),
        )
    finally:
        load_adapter_state(model, start)


@pytest.fixture(scope="module")
def golden() -> Golden:
    return golden_setup()


def test_the_recipe_masks_prompts_and_ends_with_eos(golden: Golden) -> None:
    """What the loss is over: each response and the chat template's end of turn (EOS, then its
    newline), never the prompt (a change here moves the numbers below; this says why)."""
    _, tokenizer, examples, _ = golden
    for record, example in zip(RECORDS, examples, strict=True):
        targets = [t for t in example.labels if t != IGNORE_INDEX]
        assert tokenizer.decode(targets) == record.response + "<|im_end|>\n"


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "padded"])
def test_the_first_step_has_the_golden_losses(golden: Golden, packed: bool) -> None:
    model, _, examples, _ = golden
    before = plain_loss(model, examples)
    reported, steps, after = train_from_start(golden, ONE_STEP, packed)
    assert steps == 1
    assert reported == pytest.approx(GOLDEN_FIRST_STEP_LOSS, rel=TOLERANCE)
    assert before == pytest.approx(GOLDEN_FIRST_STEP_LOSS, rel=TOLERANCE)
    assert after == pytest.approx(GOLDEN_LOSS_AFTER_STEP, rel=TOLERANCE)
    assert after < before - 1e-3  # the step learned: the two numbers pin different things


def test_two_steps_have_the_golden_loss(golden: Golden) -> None:
    """A second step: the seeded order of the records and AdamW's moments carried over."""
    reported, steps, after = train_from_start(golden, TWO_STEPS, packed=True)
    assert steps == 2
    assert reported == pytest.approx(GOLDEN_TWO_STEPS_LOSS, rel=TOLERANCE)
    assert after == pytest.approx(GOLDEN_LOSS_AFTER_TWO_STEPS, rel=TOLERANCE)


def test_evaluation_reports_the_golden_losses(golden: Golden) -> None:
    """`evaluate_loss` (what every round records) agrees with the plain computation."""
    model, tokenizer, examples, start = golden
    assert evaluate_loss(model, examples, 8, tokenizer.pad_token_id)["loss"] == pytest.approx(
        GOLDEN_FIRST_STEP_LOSS, rel=TOLERANCE
    )
    try:
        result = train_local(model, examples, start, ONE_STEP, SEED, tokenizer.pad_token_id)
        load_adapter_state(model, result.state)
        after = evaluate_loss(model, examples, 8, tokenizer.pad_token_id)["loss"]
        assert after == pytest.approx(GOLDEN_LOSS_AFTER_STEP, rel=TOLERANCE)
    finally:
        load_adapter_state(model, start)


if __name__ == "__main__":  # regenerate: see the module docstring
    golden = golden_setup()
    before = plain_loss(golden[0], golden[2])
    reported, _, after = train_from_start(golden, ONE_STEP, packed=True)
    print(f"GOLDEN_FIRST_STEP_LOSS = {reported!r}  # plain computation: {before!r}")
    print(f"GOLDEN_LOSS_AFTER_STEP = {after!r}")
    reported, _, after = train_from_start(golden, TWO_STEPS, packed=True)
    print(f"GOLDEN_TWO_STEPS_LOSS = {reported!r}")
    print(f"GOLDEN_LOSS_AFTER_TWO_STEPS = {after!r}")
