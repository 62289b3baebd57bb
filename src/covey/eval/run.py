"""`covey eval`: adapters side by side with their base model on a held-out file.

    sources = choose_sources(run, rounds, adapters, base, template, device)  # no model yet
    result = run_eval(sources, options)  # load once, score every model, write the folder

Every model answers every record with the same decoding (plain greedy by default, so results
reproduce), batched. The output folder appears whole or not at all:

    OUT/eval.json        per model: held-out loss, perplexity, ROUGE-L F1 (overall, per
                         category, and against the base, paired), heavy repetition, distinct-2,
                         mean words; the generation and scoring settings; sample answers
    OUT/answers.jsonl    one line per record: instruction, context, reference, category and
                         each model's answer with its ROUGE-L F1
    OUT/comparison.png   ROUGE-L per category and heavy repetition, per model

Adapters come from `covey.serve.adapters` (runs, rounds, PEFT folders, fetched FLock tasks);
every adapter is checked against the base before the base loads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from covey.atomic import atomic_directory, check_output_dir
from covey.data.records import Record, load_records, read_raw_records, spread
from covey.errors import ConfigError, DataError
from covey.model.generate import (
    DEFAULT_PRESET,
    GenerationSettings,
    answer_records,
    preset_settings,
)
from covey.serve.adapters import AdapterSource, check_base_matches, resolve_source
from covey.train.metrics import (
    REPEAT_NGRAM,
    REPEAT_TIMES,
    ROUGE_SETTINGS,
    answer_scores,
    paired_difference,
    summarize,
)

log = logging.getLogger("covey.eval")

EVAL_DECODING = GenerationSettings(repetition_penalty=1.0, max_new_tokens=128)
"""Plain greedy decoding: the likeliest token every step, nothing that favours one model's
style, so figures reproduce and compare with published greedy ROUGE-L."""
BASE_NAME = "base"
EVAL_JSON = "eval.json"
ANSWERS_JSONL = "answers.jsonl"
COMPARISON_PNG = "comparison.png"


@dataclass(frozen=True)
class EvalOptions:
    """What `covey eval` measures and where it writes (the adapters aside)."""

    out: Path
    test: Path | None = None
    """The held-out file; default: the first run's `test.jsonl` (its `data.dir`)."""
    settings: GenerationSettings = field(default_factory=lambda: EVAL_DECODING)
    """Decoding for the scored answers."""
    batch_size: int = 8
    """Prompts per `generate` call and examples per loss pass."""
    limit: int = 0
    """Evaluate this many records, spread over the file (0: all)."""
    show: int = 3
    """Sample records answered again with the serving defaults, for reading (0: none)."""
    overwrite: bool = False

    def check(self) -> None:
        self.settings.check()
        for name, low in (("batch_size", 1), ("limit", 0), ("show", 0)):
            value = getattr(self, name)
            if value < low:
                flag = name.replace("_", "-")
                raise ConfigError(f"--{flag} must be >= {low}, got {value}")


def decoding_settings(
    preset: str | None, repetition_penalty: float | None, max_new_tokens: int | None
) -> GenerationSettings:
    """Plain greedy unless a serving preset is named; the flags change either."""
    if preset is not None:
        return preset_settings(
            preset, repetition_penalty=repetition_penalty, max_new_tokens=max_new_tokens
        )
    settings = EVAL_DECODING
    if repetition_penalty is not None:
        settings = replace(settings, repetition_penalty=repetition_penalty)
    if max_new_tokens is not None:
        settings = replace(settings, max_new_tokens=max_new_tokens)
    settings.check()
    return settings


def describe(settings: GenerationSettings) -> str:
    """One line naming the decoding: `covey eval`'s own default, a serving preset, or custom."""
    text = settings.describe()
    if replace(settings, max_new_tokens=EVAL_DECODING.max_new_tokens) == EVAL_DECODING:
        return text.replace("custom settings: ", "plain greedy, no repetition penalty: ", 1)
    return text


# ---------------------------------------------------------------- which adapters, which records


def choose_sources(
    run: Path | None,
    rounds: list[int],
    adapters: list[Path],
    base: str | None = None,
    template: str | None = None,
    device: str | None = None,
) -> list[AdapterSource]:
    """The adapters named by the flags, with every file check done (nothing loaded): the run's
    final adapter (or each `--round`), then each `--adapter` folder."""
    if run is None and rounds:
        raise ConfigError("--round needs --run (a run folder holds the rounds)")
    if run is None and not adapters:
        raise ConfigError(
            "name what to evaluate: --run RUN_DIR (a `covey train` output folder; its final "
            "adapter, or --round K) and/or --adapter DIR (a PEFT adapter folder, repeatable)"
        )
    sources = []
    if run is not None:
        indices: list[int | None] = [*rounds] or [None]
        for index in indices:
            sources.append(resolve_source(run, index, base, None, template, device))
    for folder in adapters:
        sources.append(resolve_source(None, None, base, folder, template, device))
    return sources


def test_records(path: Path, limit: int = 0) -> list[Record]:
    """The held-out records, every one with a reference response (`limit`: that many, spread
    over the file, which `covey data split` writes grouped by category)."""
    if not path.is_file():
        raise ConfigError(
            f"--test {path}: no such file; pass a held-out JSONL/JSON/CSV/Parquet file"
        )
    raw = read_raw_records(path)
    if raw and not any(
        isinstance(item, dict) and ("response" in item or "output" in item) for _, item in raw
    ):
        raise DataError(
            f"--test {path}: no record has a reference answer (a `response` or `output` field); "
            "covey eval scores answers against references: pass a held-out file with responses, "
            "such as the test.jsonl that `covey data split` writes"
        )
    records = load_records(path).records
    return spread(records, limit) if limit else records


def _default_test(sources: list[AdapterSource]) -> Path:
    for source in sources:
        if source.run_dir is not None:
            return Path(source.cfg.data.dir) / "test.jsonl"
    raise ConfigError("--test: name the held-out file (no --run gives a default test.jsonl)")


# ---------------------------------------------------------------- the evaluation


@dataclass
class EvalResult:
    """What `run_eval` wrote: eval.json's content, and the answers file's lines."""

    out: Path
    summary: dict[str, Any]
    answers: list[dict[str, Any]] = field(default_factory=list)


def run_eval(sources: list[AdapterSource], options: EvalOptions) -> EvalResult:
    """Score the base model and every adapter on the held-out records; write `options.out`."""
    from covey.data.prompts import check_template, tokenize_records
    from covey.fed.rounds import check_targets
    from covey.serve.adapters import check_adapter_shapes, load_adapter

    options.check()
    check_output_dir(options.out, options.overwrite)
    test = options.test or _default_test(sources)
    records = test_records(test, options.limit)
    cfg = sources[0].cfg  # the base model, template and device every model is run with
    shared = [replace(s, cfg=cfg) for s in sources]
    base_id = ""
    for source in shared:  # before the base loads: a mismatch costs nothing
        base_id = check_base_matches(source)
    names = _model_names(sources)
    started = time.perf_counter()

    loaded = load_adapter(shared[0])
    model, tokenizer = loaded.model, loaded.tokenizer
    check_template(cfg.prompt.template, tokenizer)
    adapter_names = ["default"]
    for k, source in enumerate(shared[1:], start=1):
        check_adapter_shapes(model.get_base_model(), source.adapter_dir)
        model.load_adapter(str(source.adapter_dir), adapter_name=f"adapter_{k}")
        adapter_names.append(f"adapter_{k}")
    load_seconds = time.perf_counter() - started
    examples = tokenize_records(records, tokenizer, cfg.prompt, mask_prompt=True)
    check_targets(examples, str(test), cfg)

    everyone = [(BASE_NAME, None), *zip(names, adapter_names, strict=True)]
    models: list[dict[str, Any]] = []
    for name, adapter in everyone:
        log.info("held-out loss of %s on %d records", name, len(records))
        with _active(model, adapter):
            models.append({"name": name} | _loss(model, tokenizer, examples, options))
    log.info("answering %d records with %d models at once", len(records), len(everyone))
    generating = time.perf_counter()
    answered = _answers(
        model,
        tokenizer,
        records,
        cfg.prompt.template,
        options.settings,
        options.batch_size,
        [adapter for _, adapter in everyone],
    )
    generate_seconds = time.perf_counter() - generating
    texts = {name: answers for (name, _), answers in zip(everyone, answered, strict=True)}
    scores = {
        name: [answer_scores(text, r.response) for text, r in zip(mine, records, strict=True)]
        for name, mine in texts.items()
    }
    source_of = dict(zip(names, sources, strict=True))
    for entry in models:
        entry |= _quality(entry["name"], scores, records)
        if entry["name"] in source_of:
            entry["adapter"] = _describe_source(source_of[entry["name"]])

    samples = _samples(
        model, tokenizer, records, cfg.prompt.template, names, adapter_names, options
    )
    summary = {
        "base_model": {"base": cfg.model.base, "id": base_id},
        "test": {
            "file": str(test),
            "sha256": hashlib.sha256(test.read_bytes()).hexdigest(),
            "records": len(records),
            "limit": options.limit,
        },
        "template": cfg.prompt.template,
        "generation": {
            "settings": dataclasses.asdict(options.settings),
            "described": describe(options.settings),
            "batch_size": options.batch_size,
        },
        "scoring": {
            "rouge_l": ROUGE_SETTINGS,
            "heavy_repetition": f"a word {REPEAT_NGRAM}-gram {REPEAT_TIMES} or more times",
            "distinct_2": "distinct word bigrams / word bigrams, mean over answers",
            "loss": "next-token loss on the reference responses (nats/token)",
        },
        "models": models,
        "samples": samples,
        "seconds": {
            "load": load_seconds,
            "generate": generate_seconds,  # every model's answers, in mixed-adapter batches
            "total": time.perf_counter() - started,
        },
    }
    answers = [
        {
            "id": r.id,
            "category": r.category,
            "instruction": r.instruction,
            "context": r.context,
            "reference": r.response,
            "answers": {name: texts[name][i] for name in texts},
            "rouge_l": {name: round(scores[name][i]["rouge_l"], 6) for name in scores},
        }
        for i, r in enumerate(records)
    ]
    result = EvalResult(options.out, summary, answers)
    _write(result, options.overwrite)
    return result


def _model_names(sources: list[AdapterSource]) -> list[str]:
    """`round 3`, `my-adapter`, ...; the folder path where two labels would be the same."""
    labels = [s.label for s in sources]
    return [
        str(s.adapter_dir) if labels.count(s.label) > 1 or s.label == BASE_NAME else s.label
        for s in sources
    ]


def _describe_source(source: AdapterSource) -> dict[str, Any]:
    return {
        "folder": str(source.adapter_dir),
        "run": str(source.run_dir) if source.run_dir is not None else None,
        "round": source.round_index,
    }


@contextlib.contextmanager
def _active(model: Any, adapter: str | None) -> Iterator[None]:
    """The PEFT model answering as the bare base (`None`) or with one adapter."""
    if adapter is None:
        with model.disable_adapter():
            yield
    else:
        model.set_adapter(adapter)
        yield


def _loss(model: Any, tokenizer: Any, examples: list[Any], options: EvalOptions) -> dict[str, Any]:
    """Held-out loss and perplexity of the model as it answers now, with the time it took."""
    from covey.train.evaluate import evaluate_loss

    started = time.perf_counter()
    loss = evaluate_loss(model, examples, options.batch_size, int(tokenizer.pad_token_id))
    return {
        "loss": loss["loss"],
        "perplexity": loss["perplexity"],
        "seconds": {"loss": time.perf_counter() - started},
    }


def _answers(
    model: Any,
    tokenizer: Any,
    records: list[Record],
    template: str,
    settings: GenerationSettings,
    batch_size: int,
    adapters: list[str | None],
) -> list[list[str]]:
    """Each adapter's answers (None: the base model's) to `records`, `batch_size` records per
    `generate` call with one row per adapter (`covey.model.generate.generate_ids`)."""
    settings.seed_sampler()
    return answer_records(
        model, tokenizer, records, template, settings.generate_kwargs(), batch_size, adapters
    )


def _quality(
    name: str, scores: dict[str, list[dict[str, Any]]], records: list[Record]
) -> dict[str, Any]:
    """A model's answer figures, overall and per category, and its ROUGE-L against the base's
    on the same records."""
    mine = scores[name]
    by_category: dict[str, dict[str, float]] = {}
    for category in sorted({r.category for r in records}):
        rows = [s for s, r in zip(mine, records, strict=True) if r.category == category]
        by_category[category] = summarize(rows)
    quality: dict[str, Any] = summarize(mine) | {"by_category": by_category}
    if name != BASE_NAME:
        quality["rouge_l_vs_base"] = paired_difference(
            [s["rouge_l"] for s in mine], [s["rouge_l"] for s in scores[BASE_NAME]]
        )
    return quality


def _samples(
    model: Any,
    tokenizer: Any,
    records: list[Record],
    template: str,
    names: list[str],
    adapter_names: list[str],
    options: EvalOptions,
) -> dict[str, Any]:
    """A few records answered with the serving defaults (what `covey serve` and `covey
    generate` would say), spread over the records, for a person to read."""
    settings = preset_settings(DEFAULT_PRESET, max_new_tokens=options.settings.max_new_tokens)
    chosen = spread(records, options.show)
    rows: list[dict[str, Any]] = [
        {"id": r.id, "category": r.category, "instruction": r.instruction, "answers": {}}
        for r in chosen
    ]
    if chosen:
        everyone = [(BASE_NAME, None), *zip(names, adapter_names, strict=True)]
        adapters = [adapter for _, adapter in everyone]
        answered = _answers(
            model, tokenizer, chosen, template, settings, options.batch_size, adapters
        )
        for (name, _), texts in zip(everyone, answered, strict=True):
            for row, text in zip(rows, texts, strict=True):
                row["answers"][name] = text
    return {"described": settings.describe(), "answers": rows}


def _write(result: EvalResult, overwrite: bool) -> None:
    from covey.eval.report import plot_comparison

    with atomic_directory(result.out, overwrite=overwrite) as staging:
        (staging / EVAL_JSON).write_text(json.dumps(result.summary, indent=2) + "\n")
        lines = "".join(json.dumps(a, ensure_ascii=False) + "\n" for a in result.answers)
        (staging / ANSWERS_JSONL).write_text(lines, encoding="utf-8")
        plot_comparison(result.summary, staging / COMPARISON_PNG)
