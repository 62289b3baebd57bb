"""Answers from one resident model, with the adapter on, off, or both at once, streamed.

One model stays resident: the fine-tuned answer is the PEFT model with its adapter enabled, the
base answer the same model with it disabled, so memory is one base model plus the adapter. The
two answers of a comparison are one batched `generate` call whose rows use different adapters
(PEFT's mixed-adapter batches; `__base__` is the bare base): both grow token by token, together,
in about the time of one. Generation is serialized with a lock, because the model is shared.

Decoding settings come as named presets: `greedy` (the default: deterministic, streams, a
first token within a second for a 135M model on a CPU) and `shepherd` (Shepherd's generation:
4-beam search, deterministic, answers at once).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

from covey.data.records import Record
from covey.errors import ConfigError
from covey.serve.adapters import AdapterSource, load_adapter

log = logging.getLogger("covey.serve")

BASE = False
TUNED = True
"""Panes: a pane is an answer without (`BASE`) or with (`TUNED`) the adapter."""
_BARE_BASE = "__base__"  # PEFT's adapter name for "no adapter" in a mixed batch


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


@dataclass
class ServeSession:
    """The resident PEFT model and tokenizer; answers with the adapter on, off, or both."""

    model: Any
    tokenizer: Any
    source: AdapterSource
    base_id: str
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def device(self) -> Any:
        """The torch device the model runs on."""
        return next(self.model.parameters()).device

    @property
    def template(self) -> str:
        return self.source.cfg.prompt.template

    def prompt(self, instruction: str, context: str = "") -> str:
        """The training template applied to one instruction (and optional context)."""
        from covey.data.prompts import build_prompt

        record = Record(instruction=instruction, context=context, response="", category="", id=0)
        return build_prompt(record, self.template, self.tokenizer)

    def generate(
        self, instruction: str, context: str, settings: GenerationSettings, adapter: bool = TUNED
    ) -> str:
        """One whole answer (the base model's when `adapter` is false)."""
        *_, last = self.stream(instruction, context, settings, (adapter,))
        return last[0]

    def stream(
        self,
        instruction: str,
        context: str,
        settings: GenerationSettings,
        panes: Sequence[bool] = (TUNED,),
    ) -> Iterator[tuple[str, ...]]:
        """The answers so far, one per pane (`BASE`, `TUNED`), growing token by token with one
        beam; with more, once at the end. The last value holds the whole answers, stripped.

        `generate` runs in a thread feeding the reader; closing this iterator early stops that
        thread at the next token.
        """
        settings.check()
        prompt = self.prompt(instruction, context)
        if not settings.streams:
            with self._lock:
                rows = self._generate(prompt, settings, panes)
            yield tuple(self._text(ids).strip() for ids in rows)
            return
        streamer = _PaneStreamer(len(panes), self._stop_ids())
        stop = threading.Event()
        failures: list[BaseException] = []

        def work() -> None:
            try:
                self._generate(prompt, settings, panes, streamer=streamer, stop=stop)
            except BaseException as e:  # handed to the reading side
                failures.append(e)
            finally:
                streamer.end()

        with self._lock:
            thread = threading.Thread(target=work, name="covey-generate", daemon=True)
            thread.start()
            shown: tuple[str, ...] | None = None
            try:
                for rows in streamer:
                    texts = tuple(self._partial_text(ids) for ids in rows)
                    if texts != shown and any(texts):
                        shown = texts
                        yield texts
            finally:
                stop.set()
                thread.join()
        if failures:
            raise failures[0]
        final = tuple(self._text(ids).strip() for ids in streamer.rows)
        if final != shown:  # always at least one value, however short the answers
            yield final

    def answer_ids(
        self, prompt: str, settings: GenerationSettings, panes: Sequence[bool] = (TUNED,)
    ) -> list[list[int]]:
        """Token ids answering an already templated `prompt`, one list per pane, up to and
        without the first end-of-sequence token."""
        settings.check()
        with self._lock:
            return self._generate(prompt, settings, panes)

    def _generate(
        self,
        prompt: str,
        settings: GenerationSettings,
        panes: Sequence[bool],
        streamer: _PaneStreamer | None = None,
        stop: threading.Event | None = None,
    ) -> list[list[int]]:
        import torch
        from transformers import StoppingCriteriaList

        if not panes:
            raise ValueError("no pane to answer")
        device = self.device
        encoded = self.tokenizer(
            prompt, return_tensors="pt", add_special_tokens=self.template != "chat"
        )
        ids = encoded["input_ids"].to(device).repeat(len(panes), 1)
        extra: dict[str, Any] = {}
        if streamer is not None:
            extra["streamer"] = streamer
        if stop is not None:
            extra["stopping_criteria"] = StoppingCriteriaList([_StopWhenSet(stop)])
        if len(set(panes)) > 1:  # one row per pane, each with its own adapter
            active = self.model.active_adapter
            extra["adapter_names"] = [active if on else _BARE_BASE for on in panes]
            switch: Any = contextlib.nullcontext()
        else:
            switch = contextlib.nullcontext() if panes[0] else self.model.disable_adapter()
        if settings.sample and settings.seed is not None:
            torch.manual_seed(settings.seed)
        with torch.no_grad(), switch:
            output = self.model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                pad_token_id=self.tokenizer.pad_token_id,
                **settings.generate_kwargs(),
                **extra,
            )
        stop_ids = self._stop_ids()
        return [_until_stop(row.tolist(), stop_ids) for row in output[:, ids.shape[1] :]]

    def _stop_ids(self) -> set[int]:
        ids = getattr(self.model.generation_config, "eos_token_id", None)
        stop = set(ids) if isinstance(ids, list) else {ids} if ids is not None else set()
        if self.tokenizer.eos_token_id is not None:
            stop.add(self.tokenizer.eos_token_id)
        return stop

    def _text(self, ids: list[int]) -> str:
        return str(
            self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        )

    def _partial_text(self, ids: list[int]) -> str:
        """The text so far, without a trailing incomplete character (a multi-byte character
        split over tokens decodes to U+FFFD until its last byte arrives)."""
        return self._text(ids).rstrip("\ufffd").lstrip()


def _until_stop(ids: list[int], stop_ids: set[int]) -> list[int]:
    for i, token in enumerate(ids):
        if token in stop_ids:
            return ids[:i]
    return ids


class _PaneStreamer:
    """Receives `generate`'s tokens (a transformers streamer: `put` and `end`) and hands each
    pane's token ids so far to the reading thread, which iterates over it."""

    def __init__(self, panes: int, stop_ids: set[int]) -> None:
        self.rows: list[list[int]] = [[] for _ in range(panes)]
        self._stopped = [False] * panes
        self._stop_ids = stop_ids
        self._prompt_seen = False
        self._queue: queue.Queue[list[list[int]] | None] = queue.Queue()

    def put(self, value: Any) -> None:
        if not self._prompt_seen:  # generate first hands over the prompt
            self._prompt_seen = True
            return
        for row, token in enumerate(value.reshape(len(self.rows), -1)[:, -1].tolist()):
            if self._stopped[row]:
                continue  # a finished row is padded until the others finish
            if token in self._stop_ids:
                self._stopped[row] = True
            else:
                self.rows[row].append(token)
        self._queue.put([list(r) for r in self.rows])

    def end(self) -> None:
        self._queue.put(None)

    def __iter__(self) -> Iterator[list[list[int]]]:
        while (rows := self._queue.get()) is not None:
            yield rows


class _StopWhenSet:
    """A stopping criterion that ends generation once the reader has gone away."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        return torch.full(
            (input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device
        )


def load_session(source: AdapterSource) -> ServeSession:
    """The adapter loaded onto its base, with its prompt template checked, ready to decode
    (`covey.serve.decode`)."""
    from covey.data.prompts import check_template
    from covey.serve.decode import transpose_output_projection

    loaded = load_adapter(source)
    check_template(source.cfg.prompt.template, loaded.tokenizer)
    transpose_output_projection(loaded.model)
    return ServeSession(loaded.model, loaded.tokenizer, source, loaded.base_id)
