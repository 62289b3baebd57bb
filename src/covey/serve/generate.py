"""Answers from one resident model, with the adapter on, off, or both at once, streamed.

One model stays resident: the fine-tuned answer is the PEFT model with its adapter enabled, the
base answer the same model with it disabled, so memory is one base model plus the adapter. The
two answers of a comparison are one batched `generate` call whose rows use different adapters
(`covey.model.generate.generate_ids`, PEFT's mixed-adapter batches): both grow token by token,
together, in about the time of one. Generation is serialized with a lock, because the model is
shared. This module adds what serving needs around it: the session, streaming into panes from a
thread, stopping when the reader goes away, and text as it grows.

Decoding settings are `covey.model.generate`'s presets: `greedy` (the default: deterministic,
streams, a first token within a second for a 135M model on a CPU) and `shepherd` (Shepherd's
generation: 4-beam search, deterministic, answers at once).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from covey.data.records import Record
from covey.model.generate import GenerationSettings, generate_ids, stop_ids
from covey.serve.adapters import AdapterSource, load_adapter

log = logging.getLogger("covey.serve")

BASE = False
TUNED = True
"""Panes: a pane is an answer without (`BASE`) or with (`TUNED`) the adapter."""


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
        streamer = _PaneStreamer(len(panes), stop_ids(self.model, self.tokenizer))
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
        from transformers import StoppingCriteriaList

        if not panes:
            raise ValueError("no pane to answer")
        extra: dict[str, Any] = {}
        if streamer is not None:
            extra["streamer"] = streamer
        if stop is not None:
            extra["stopping_criteria"] = StoppingCriteriaList([_StopWhenSet(stop)])
        active = self.model.active_adapter
        settings.seed_sampler()
        [rows] = generate_ids(
            self.model,
            self.tokenizer,
            [prompt],
            settings.generate_kwargs(),
            special_tokens=self.template != "chat",
            adapters=[active if on else None for on in panes],
            **extra,
        )
        return rows

    def _text(self, ids: list[int]) -> str:
        return str(
            self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        )

    def _partial_text(self, ids: list[int]) -> str:
        """The text so far, without a trailing incomplete character (a multi-byte character
        split over tokens decodes to U+FFFD until its last byte arrives)."""
        return self._text(ids).rstrip("\ufffd").lstrip()


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
