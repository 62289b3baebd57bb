"""Batched, length-ordered, mixed-adapter generation gives each prompt exactly the greedy answer
it gets alone, from the model it asked for."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch
from peft import LoraConfig, get_peft_model

from covey.data.records import Record
from covey.model.generate import answer_records, generate_ids, stop_ids, until_stop
from tests.model.tiny import make_tiny_tokenizer, tiny_config

# lengths out of order (so the length ordering must put the answers back) and far apart (so
# every batch pads some rows)
PROMPTS = [
    "The weather today is",
    "A",
    "Tell me, in as many words as you can find, what the theory says about",
    "Name a bird.",
    "Why?",
]
NEW_TOKENS = 6


@pytest.fixture(scope="module")
def tiny() -> tuple[Any, Any]:
    """A config-built tiny Llama with two random LoRA adapters, `one` (active) and `two`."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(tiny_config())
    lora = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "down_proj"],
        init_lora_weights=False,  # random B too: an adapter that changes the answers
    )
    model = get_peft_model(base, lora, adapter_name="one")
    torch.manual_seed(1)
    model.add_adapter("two", lora)
    model.set_adapter("one")
    model.eval()
    return model, make_tiny_tokenizer()


def alone(
    model: Any, tokenizer: Any, prompt: str, adapter: str | None, special: bool = True
) -> list[int]:
    """The greedy answer to one prompt, unbatched and unpadded, by plain `generate`."""
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=special)["input_ids"]
    previous = model.active_adapter
    with torch.no_grad():
        if adapter is None:
            with model.disable_adapter():
                output = model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=NEW_TOKENS,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                )
        else:
            model.set_adapter(adapter)
            output = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
            model.set_adapter(previous)
    return until_stop(output[0, ids.shape[1] :].tolist(), stop_ids(model, tokenizer))


@pytest.fixture(scope="module")
def expected(tiny: tuple[Any, Any]) -> dict[str | None, list[list[int]]]:
    model, tokenizer = tiny
    return {
        adapter: [alone(model, tokenizer, p, adapter) for p in PROMPTS]
        for adapter in (None, "one", "two")
    }


def test_the_reference_answers_tell_the_models_apart(
    expected: dict[str | None, list[list[int]]],
) -> None:
    """Else the comparisons below could not catch a row answered by the wrong adapter."""
    for answers in expected.values():
        assert all(answers), "an empty answer compares equal to too much"
    assert expected[None] != expected["one"] != expected["two"] != expected[None]
    for i in range(len(PROMPTS)):
        assert len({tuple(expected[a][i]) for a in expected}) == 3


@pytest.mark.parametrize("batch_size", [1, 2, 5])
def test_mixed_adapter_batches_answer_as_each_model_alone(
    tiny: tuple[Any, Any], expected: dict[str | None, list[list[int]]], batch_size: int
) -> None:
    model, tokenizer = tiny
    adapters = [None, "two", "one"]
    got = generate_ids(
        model,
        tokenizer,
        PROMPTS,
        {"max_new_tokens": NEW_TOKENS},
        special_tokens=True,
        adapters=adapters,
        batch_size=batch_size,
    )
    assert got == [[expected[a][i] for a in adapters] for i in range(len(PROMPTS))]
    assert model.active_adapter == "one" and not model.training  # nothing switched for good


@pytest.mark.parametrize("adapters", [None, ["one"], [None], ["two"]])
def test_one_model_at_a_time_answers_as_alone(
    tiny: tuple[Any, Any],
    expected: dict[str | None, list[list[int]]],
    adapters: list[str | None] | None,
) -> None:
    """The model as it is (its active adapter), the bare base, another adapter than the active
    one: batched by length, each answer as alone, in the prompts' order."""
    model, tokenizer = tiny
    got = generate_ids(
        model,
        tokenizer,
        PROMPTS,
        {"max_new_tokens": NEW_TOKENS},
        special_tokens=True,
        adapters=adapters,
        batch_size=2,
    )
    which = "one" if adapters is None else adapters[0]
    assert got == [[answer] for answer in expected[which]]


def test_answers_to_records_are_the_decoded_ids(
    tiny: tuple[Any, Any], expected: dict[str | None, list[list[int]]]
) -> None:
    """`answer_records` templates the records (the chat template holds its special tokens, so
    the tokenizer adds none) and decodes each model's answers, in the records' order."""
    from covey.data.prompts import build_prompt

    model, tokenizer = tiny
    records = [
        Record(instruction=p, context="", response="", category="", id=i)
        for i, p in enumerate(PROMPTS)
    ]
    texts = answer_records(
        model, tokenizer, records, "chat", {"max_new_tokens": NEW_TOKENS}, 3, [None, "one"]
    )
    for j, adapter in enumerate([None, "one"]):
        wanted = [
            tokenizer.decode(
                alone(model, tokenizer, build_prompt(r, "chat", tokenizer), adapter, special=False),
                skip_special_tokens=True,
            ).strip()
            for r in records
        ]
        assert texts[j] == wanted


def test_stop_ids_cut_the_answer() -> None:
    assert until_stop([5, 6, 2, 7], {2}) == [5, 6]
    assert until_stop([5, 6], {2}) == [5, 6]

    # a generation config may hold one end-of-sequence id or a list; the tokenizer adds its own
    listed = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=[2, 9]))
    single = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=2))
    assert stop_ids(listed, SimpleNamespace(eos_token_id=4)) == {2, 9, 4}
    assert stop_ids(single, SimpleNamespace(eos_token_id=None)) == {2}
