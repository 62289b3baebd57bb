"""Prompt templates and tokenization: records become `(input_ids, labels)` once per client.

Two templates:
- `alpaca`: Shepherd's (and Alpaca-LoRA's) instruction template, for base models.
- `chat`: the tokenizer's own chat template (instruction and context as the user turn, the
  response as the assistant turn), for instruct models such as SmolLM2-Instruct.

Tokenization follows Shepherd: the full text (prompt + response) is tokenized once, truncated to
`cutoff_len`, EOS appended when the template does not end the turn itself and there is room;
with `train_on_inputs = false` the first `len(tokenize(prompt))` labels are masked (-100) so only
the response is learned. (A chat template such as SmolLM2's ends every turn with `<|im_end|>\n`,
its EOS: a second one would teach the model a turn ending that inference never sees.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from covey.config import PromptConfig
from covey.data.records import Record
from covey.errors import ConfigError

IGNORE_INDEX = -100
"""Label value that PyTorch's cross-entropy skips."""

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
TEMPLATES = ("alpaca", "chat")


@dataclass
class Example:
    """One tokenized training or evaluation sequence."""

    input_ids: list[int]
    labels: list[int]

    @property
    def num_target_tokens(self) -> int:
        """Tokens that contribute to the loss (labels shifted by one, as the model predicts)."""
        return sum(1 for t in self.labels[1:] if t != IGNORE_INDEX)


def build_prompt(record: Record, template: str, tokenizer: Any) -> str:
    """The text a model sees before its answer."""
    if template == "alpaca":
        if record.context.strip():
            return ALPACA_WITH_INPUT.format(instruction=record.instruction, input=record.context)
        return ALPACA_NO_INPUT.format(instruction=record.instruction)
    if template == "chat":
        return str(
            tokenizer.apply_chat_template(
                _chat_messages(record), tokenize=False, add_generation_prompt=True
            )
        )
    raise ConfigError(f"prompt.template {template!r} is unknown; choose one of {TEMPLATES}")


def build_full_text(record: Record, template: str, tokenizer: Any) -> str:
    """Prompt plus the reference response."""
    if template == "chat":
        messages = [*_chat_messages(record), {"role": "assistant", "content": record.response}]
        return str(tokenizer.apply_chat_template(messages, tokenize=False))
    return build_prompt(record, template, tokenizer) + record.response


def check_template(template: str, tokenizer: Any) -> None:
    """Fail early, with the fix, when a template cannot be used with this tokenizer."""
    if template not in TEMPLATES:
        raise ConfigError(f"prompt.template {template!r} is unknown; choose one of {TEMPLATES}")
    if template == "chat" and not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            "prompt.template = 'chat' but this tokenizer has no chat template; "
            "use prompt.template = 'alpaca'"
        )


def tokenize_records(
    records: Sequence[Record], tokenizer: Any, cfg: PromptConfig, mask_prompt: bool | None = None
) -> list[Example]:
    """Tokenize records for training (or, with `mask_prompt=True`, for response-only loss).

    Texts are tokenized in one batched call (fast tokenizers run it in Rust).
    """
    check_template(cfg.template, tokenizer)
    if cfg.cutoff_len < 2:
        raise ConfigError(f"prompt.cutoff_len must be at least 2 (got {cfg.cutoff_len})")
    mask = (not cfg.train_on_inputs) if mask_prompt is None else mask_prompt
    full = [build_full_text(r, cfg.template, tokenizer) for r in records]
    # chat templates already hold their special tokens; alpaca gets the tokenizer's BOS, if any
    special = cfg.template != "chat"
    full_ids = tokenizer(
        full, add_special_tokens=special, truncation=True, max_length=cfg.cutoff_len
    )
    prompt_lens = [0] * len(records)
    if mask:
        prompts = [build_prompt(r, cfg.template, tokenizer) for r in records]
        encoded = tokenizer(prompts, add_special_tokens=special)["input_ids"]
        prompt_lens = [len(ids) for ids in encoded]
    eos = tokenizer.eos_token_id
    append_eos = cfg.add_eos and eos is not None and not ends_turn(cfg.template, tokenizer)
    examples = []
    for ids, prompt_len in zip(full_ids["input_ids"], prompt_lens, strict=True):
        ids = list(ids)
        if append_eos and ids[-1] != eos and len(ids) < cfg.cutoff_len:
            ids.append(eos)
        labels = [IGNORE_INDEX] * min(prompt_len, len(ids)) + ids[prompt_len:]
        examples.append(Example(input_ids=ids, labels=labels))
    return examples


def ends_turn(template: str, tokenizer: Any) -> bool:
    """Whether the template itself puts the EOS token after the response (chat templates
    usually do; alpaca does not)."""
    if template != "chat" or not tokenizer.eos_token:
        return False
    probe = Record(instruction="?", context="", response="\x00probe\x00", category="", id=0)
    text = build_full_text(probe, template, tokenizer)
    return tokenizer.eos_token in text[text.rfind(probe.response) + len(probe.response) :]


def _chat_messages(record: Record) -> list[dict[str, str]]:
    content = record.instruction
    if record.context.strip():
        content = f"{record.instruction}\n\n{record.context}"
    return [{"role": "user", "content": content}]
