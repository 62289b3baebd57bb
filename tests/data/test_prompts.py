"""Prompt templates and tokenization: Shepherd's alpaca format, chat templates, masking, EOS."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from covey.config import PromptConfig
from covey.data.prompts import IGNORE_INDEX, build_prompt, tokenize_records
from covey.data.records import Record
from covey.errors import ConfigError


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path):  # type: ignore[no-untyped-def]
    return AutoTokenizer.from_pretrained(tiny_model_dir)


RECORD = Record("Name a colour.", "", "Blue.", "open_qa", 0)
WITH_CONTEXT = Record("Summarise.", "A long text.", "Short.", "summarization", 1)


def test_alpaca_prompts_match_shepherd(tokenizer) -> None:  # type: ignore[no-untyped-def]
    assert build_prompt(RECORD, "alpaca", tokenizer) == (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nName a colour.\n\n### Response:\n"
    )
    assert "### Input:\nA long text.\n\n### Response:\n" in build_prompt(
        WITH_CONTEXT, "alpaca", tokenizer
    )


def test_train_on_inputs_masks_only_when_off(tokenizer) -> None:  # type: ignore[no-untyped-def]
    (full,) = tokenize_records([RECORD], tokenizer, PromptConfig(train_on_inputs=True))
    (masked,) = tokenize_records([RECORD], tokenizer, PromptConfig(train_on_inputs=False))
    assert full.input_ids == masked.input_ids and full.labels == full.input_ids
    prompt_len = len(tokenizer(build_prompt(RECORD, "alpaca", tokenizer))["input_ids"])
    assert masked.labels[:prompt_len] == [IGNORE_INDEX] * prompt_len
    assert masked.labels[prompt_len:] == masked.input_ids[prompt_len:]
    assert tokenizer.decode(masked.input_ids[prompt_len:]) == "Blue." + tokenizer.eos_token


def test_eos_and_cutoff(tokenizer) -> None:  # type: ignore[no-untyped-def]
    (ex,) = tokenize_records([RECORD], tokenizer, PromptConfig(add_eos=False))
    assert ex.input_ids[-1] != tokenizer.eos_token_id
    (cut,) = tokenize_records([RECORD], tokenizer, PromptConfig(cutoff_len=20))
    assert len(cut.input_ids) == 20 and cut.input_ids[-1] != tokenizer.eos_token_id  # no room


def test_chat_template_uses_the_tokenizers_own(tokenizer) -> None:  # type: ignore[no-untyped-def]
    cfg = PromptConfig(template="chat", train_on_inputs=False)
    prompt = build_prompt(WITH_CONTEXT, "chat", tokenizer)
    assert (
        prompt == "<|im_start|>user\nSummarise.\n\nA long text.<|im_end|>\n<|im_start|>assistant\n"
    )
    (ex,) = tokenize_records([WITH_CONTEXT], tokenizer, cfg)
    target = [t for t in ex.labels if t != IGNORE_INDEX]
    assert tokenizer.decode(target).startswith("Short.<|im_end|>")


def test_template_errors(tokenizer) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError, match=r"template = .vicuna. is not one of: alpaca, chat"):
        PromptConfig(template="vicuna")  # type: ignore[arg-type]
    template, tokenizer.chat_template = tokenizer.chat_template, None
    try:
        with pytest.raises(ConfigError, match="no chat template"):
            tokenize_records([RECORD], tokenizer, PromptConfig(template="chat"))
    finally:
        tokenizer.chat_template = template


def test_one_end_of_turn_per_sequence(tokenizer) -> None:  # type: ignore[no-untyped-def]
    """The chat template ends the assistant turn itself (`<|im_end|>\\n`): no second EOS.
    Alpaca has no end of turn: EOS is appended."""
    eos = tokenizer.eos_token_id
    (chat,) = tokenize_records([RECORD], tokenizer, PromptConfig(template="chat"))
    assert chat.input_ids.count(eos) == 2  # the user turn's and the assistant turn's
    assert tokenizer.decode(chat.input_ids).endswith("Blue.<|im_end|>\n")
    (alpaca,) = tokenize_records([RECORD], tokenizer, PromptConfig(template="alpaca"))
    assert alpaca.input_ids.count(eos) == 1 and alpaca.input_ids[-1] == eos


def test_a_chat_template_without_an_end_of_turn_gets_eos(tokenizer) -> None:  # type: ignore[no-untyped-def]
    template, tokenizer.chat_template = (
        tokenizer.chat_template,
        (
            "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
        ),
    )
    try:
        (ex,) = tokenize_records([RECORD], tokenizer, PromptConfig(template="chat"))
    finally:
        tokenizer.chat_template = template
    assert ex.input_ids.count(tokenizer.eos_token_id) == 1
    assert ex.input_ids[-1] == tokenizer.eos_token_id
