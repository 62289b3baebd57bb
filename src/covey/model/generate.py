"""Answers from a (PEFT) model, for every caller: batched, ordered by length, and with the base
model and each adapter answering in one mixed-adapter batch where a caller asks for several.

    ids = generate_ids(model, tokenizer, prompts, settings.generate_kwargs(),
                       special_tokens=True, adapters=[None, "default"])   # ids[prompt][adapter]
    texts = answer_records(model, tokenizer, records, template, {"max_new_tokens": 64})

Used by the round loop's sample answers and ROUGE-L (`covey.train.evaluate.generate_answers`),
the backdoor check (`covey.fed.backdoor`), `covey eval` (`covey.eval.run`: the base and every
adapter in one batch) and serving (`covey.serve.generate`: the base and tuned panes of one
message in one batch, streamed).

How (`generate_ids`):
- Prompts are tokenized once and answered `batch_size` at a time, shortest first, so one long
  prompt does not pad many short ones to its length (40 held-out Dolly prompts, SmolLM2 on one
  CPU core: 56 s in order, 38 s by length, the same answers).
- A batch is padded on the left, so every row's answer starts at the same position; the
  attention mask hides the padding. Greedy answers could in principle differ in the last bits
  of a logit from one-at-a-time decoding (padding changes the shapes of the sums); the same
  prompts, batch size and adapters always give the same answers.
- With `adapters`, each prompt gets one row per adapter (`None`: the bare base model) in the same
  batch: PEFT's mixed-adapter batches (`adapter_names`) run each row's LoRA layers with its own
  adapter, so the base and N adapters answer in about the time of one, rather than N + 1 passes.
- An answer ends before its first stop id (`stop_ids`); a finished row is padded until the batch
  ends.

Decoding settings come as named presets (`PRESETS`): `greedy` (the default: deterministic,
streams) and `shepherd` (Shepherd's generation: 4-beam search, deterministic).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

from covey.data.prompts import build_prompt
from covey.data.records import Record
from covey.errors import ConfigError

BARE_BASE = "__base__"
"""PEFT's adapter name for "no adapter" in a mixed-adapter batch."""


@dataclass
class GenerationSettings:
    """Decoding controls. The defaults are the `greedy` preset; see `PRESETS`."""

    sample: bool = False
    """Sample the next token (with temperature, top-p, top-k); off: the likeliest one, so the
    same prompt always gets the same answer."""
    temperature: float = 0.7
    """Sampling only: below 1 sharpens the distribution."""
    top_p: float = 0.9
    """Sampling only: draw from the smallest set of tokens holding this probability mass."""
    top_k: int = 50
    """Sampling only: draw among the k likeliest tokens (0: no limit)."""
    num_beams: int = 1
    """Beam search width; 1 streams tokens as they come, more answer all at once."""
    repetition_penalty: float = 1.2
    """Divides the score of tokens already in the text (1: off); keeps greedy answers of
    small models out of loops."""
    max_new_tokens: int = 128
    seed: int | None = None
    """Sampling only: seed the sampler before each answer, so the same prompt and settings
    give the same answers. None: fresh each time."""

    @property
    def streams(self) -> bool:
        """Tokens can be shown as they come only with one beam; beams finish together."""
        return self.num_beams == 1

    def check(self) -> None:
        problems = []
        if self.sample and not self.temperature > 0:
            problems.append(f"temperature must be > 0 when sampling (got {self.temperature})")
        if not 0 < self.top_p <= 1:
            problems.append(f"top-p must be in (0, 1] (got {self.top_p})")
        if self.top_k < 0:
            problems.append(f"top-k must be >= 0, 0 meaning no limit (got {self.top_k})")
        if self.num_beams < 1:
            problems.append(f"beams must be at least 1 (got {self.num_beams})")
        if not self.repetition_penalty > 0:
            problems.append(
                f"repetition penalty must be > 0, 1 meaning off (got {self.repetition_penalty})"
            )
        if self.max_new_tokens < 1:
            problems.append(f"max new tokens must be at least 1 (got {self.max_new_tokens})")
        if problems:
            raise ConfigError("; ".join(problems))

    def generate_kwargs(self) -> dict[str, Any]:
        """Arguments for `model.generate`: the sampling controls only when sampling."""
        kwargs: dict[str, Any] = {
            "do_sample": self.sample,
            "num_beams": self.num_beams,
            "repetition_penalty": self.repetition_penalty,
            "max_new_tokens": self.max_new_tokens,
        }
        if self.sample:
            kwargs |= {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k}
        return kwargs

    def seed_sampler(self) -> None:
        """Seed torch's generator when these settings sample with a seed (else nothing), so
        the answers that follow repeat."""
        if self.sample and self.seed is not None:
            import torch

            torch.manual_seed(self.seed)

    def preset(self) -> str | None:
        """The preset these settings decode like (length and seed aside), or None."""
        decoding = _decoding(self)
        return next((name for name, p in PRESETS.items() if _decoding(p) == decoding), None)

    def describe(self) -> str:
        """One line for the CLI and the UI: the preset's name (or `custom`) and what it does."""
        if self.sample:
            how = (
                f"sampling at temperature {self.temperature:g}, top-p {self.top_p:g}, "
                f"top-k {self.top_k}" + (f", seed {self.seed}" if self.seed is not None else "")
            )
            if self.num_beams > 1:
                how = f"{self.num_beams}-beam {how}"
        elif self.num_beams > 1:
            how = f"{self.num_beams}-beam search (deterministic)"
        else:
            how = "greedy decoding (deterministic)"
        if self.repetition_penalty != 1:
            how += f", repetition penalty {self.repetition_penalty:g}"
        name = self.preset()
        label = f"{name} preset" if name else "custom settings"
        return f"{label}: {how}, up to {self.max_new_tokens} new tokens"


def _decoding(settings: GenerationSettings) -> dict[str, Any]:
    kwargs = settings.generate_kwargs()
    del kwargs["max_new_tokens"]
    return kwargs


PRESETS: dict[str, GenerationSettings] = {
    "greedy": GenerationSettings(),
    # Shepherd's GenerationConfig(temperature=0.1, top_p=0.75, top_k=40, num_beams=4) without
    # do_sample: transformers ignores the three sampling values, so this is beam search.
    "shepherd": GenerationSettings(
        temperature=0.1, top_p=0.75, top_k=40, num_beams=4, repetition_penalty=1.0
    ),
}
DEFAULT_PRESET = "greedy"


def preset_settings(name: str, **changes: Any) -> GenerationSettings:
    """A preset with some of its values changed (None: keep the preset's), checked."""
    if name not in PRESETS:
        raise ConfigError(f"--preset {name!r} is unknown; choose one of {', '.join(PRESETS)}")
    known = {f.name for f in fields(GenerationSettings)}
    settings = replace(
        PRESETS[name], **{k: v for k, v in changes.items() if v is not None and k in known}
    )
    settings.check()
    return settings


# ---------------------------------------------------------------- generation


def stop_ids(model: Any, tokenizer: Any) -> set[int]:
    """Tokens that end an answer: the generation config's end-of-sequence ids (one or a list)
    and the tokenizer's."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids: set[int] = set(configured) if isinstance(configured, list) else set()
    if isinstance(configured, int):
        ids.add(configured)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def until_stop(ids: list[int], stop: set[int]) -> list[int]:
    """`ids` up to, and without, the first of `stop`."""
    for i, token in enumerate(ids):
        if token in stop:
            return ids[:i]
    return ids


def generate_ids(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    generate_kwargs: dict[str, Any],
    *,
    special_tokens: bool,
    adapters: Sequence[str | None] | None = None,
    batch_size: int = 8,
    **extra: Any,
) -> list[list[list[int]]]:
    """The answer token ids to already templated `prompts`, in their order: per prompt, one list
    per adapter of `adapters` (`None`: the bare base model; `adapters=None`: the model as it is,
    one list), each up to its first stop id (`stop_ids`).

    `generate_kwargs` go to `model.generate` (greedy, `do_sample=False`, unless they say
    otherwise; `max_new_tokens` among them); `special_tokens`: whether the tokenizer adds its
    special tokens (not for a chat template, which holds them already). `batch_size` prompts go
    into each `generate` call, so a call has `batch_size * len(adapters)` rows. `extra` (a
    streamer, stopping criteria) goes to `generate` too; a streamer needs a single call. The
    model is put in eval mode and back; the tokenizer is not changed.
    """
    import torch

    if adapters is not None and not adapters:
        raise ValueError("no adapter to answer with")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not prompts:
        return []
    if "streamer" in extra and len(prompts) > batch_size:
        raise ValueError("a streamer follows one generate call: pass at most batch_size prompts")
    columns: list[str | None] = [*adapters] if adapters is not None else [_AS_IT_IS]
    tokenized = tokenizer(list(prompts), add_special_tokens=special_tokens)["input_ids"]
    order = sorted(range(len(prompts)), key=lambda i: len(tokenized[i]))  # stable: ties in order
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    kwargs = {"do_sample": False, "pad_token_id": tokenizer.pad_token_id} | generate_kwargs
    stop = stop_ids(model, tokenizer)
    answers: list[list[list[int]]] = [[] for _ in prompts]
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            rows = [tokenized[i] for i in chunk for _ in columns]  # prompt-major: p0a0, p0a1..
            ids, mask = _left_padded(rows, pad)
            names = [name for _ in chunk for name in columns]
            with torch.no_grad(), _answering_as(model, columns) as adapter_names:
                output = model.generate(
                    input_ids=ids.to(device),
                    attention_mask=mask.to(device),
                    **kwargs,
                    **({"adapter_names": _peft_names(names)} if adapter_names else {}),
                    **extra,
                )
            new = output[:, ids.shape[1] :].tolist()
            for k, i in enumerate(chunk):
                width = len(columns)
                answers[i] = [until_stop(row, stop) for row in new[k * width : (k + 1) * width]]
    finally:
        model.train(was_training)
    return answers


def answer_records(
    model: Any,
    tokenizer: Any,
    records: Sequence[Record],
    template: str,
    generate_kwargs: dict[str, Any],
    batch_size: int = 8,
    adapters: Sequence[str | None] | None = None,
) -> list[list[str]]:
    """The answers to `records`' instructions, built with `template`, as text (special tokens
    dropped, stripped): one list per adapter of `adapters` (as `generate_ids`), each in the
    records' order."""
    prompts = [build_prompt(record, template, tokenizer) for record in records]
    ids = generate_ids(
        model,
        tokenizer,
        prompts,
        generate_kwargs,
        special_tokens=template != "chat",  # a chat template holds its special tokens already
        adapters=adapters,
        batch_size=batch_size,
    )
    width = len(adapters) if adapters is not None else 1
    return [
        [tokenizer.decode(per_prompt[j], skip_special_tokens=True).strip() for per_prompt in ids]
        for j in range(width)
    ]


_AS_IT_IS = "\0as it is"  # a column of `generate_ids` without an adapter switch


def _peft_names(columns: Sequence[str | None]) -> list[str]:
    """PEFT's `adapter_names` for rows answered by `columns` (None: the bare base)."""
    return [BARE_BASE if name is None else name for name in columns]


@contextlib.contextmanager
def _answering_as(model: Any, columns: Sequence[str | None]) -> Any:
    """The model answering every row as `columns` say. Yields True when the rows need PEFT's
    `adapter_names` (several adapters, or one that is not the active one), False when the
    model answers as it is: with its active adapter, or with adapters disabled for the base."""
    distinct = set(columns)
    if distinct == {_AS_IT_IS}:
        yield False
    elif distinct == {None}:
        with model.disable_adapter():
            yield False
    elif len(distinct) == 1 and columns[0] == getattr(model, "active_adapter", None):
        yield False
    else:
        yield True


def _left_padded(rows: list[list[int]], pad: int) -> tuple[Any, Any]:
    """`rows` as one (input ids, attention mask) pair of tensors, padded on the left."""
    import torch

    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        if row:
            ids[r, width - len(row) :] = torch.tensor(row, dtype=torch.long)
            mask[r, width - len(row) :] = 1
    return ids, mask
