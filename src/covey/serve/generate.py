"""Which adapter to serve, whether it fits its base, and one resident model that answers.

An adapter comes from a run folder (`--run RUN [--round K]`: `final/` or `round_<K>/`, with the
run's `config.toml` for the base model and prompt template) or from a bare adapter folder
(`--adapter DIR`, with `--base` when the folder holds no `config.toml`). Every check that can
fail runs before the base model is loaded or a server starts: the folder and round exist, the
adapter was made for this base (the id recorded by `covey train`), and its tensors fit the
base's layers.

One model stays resident: the fine-tuned answer is the PEFT model with its adapter enabled, the
base answer the same model under `disable_adapter()`, so memory is one base model plus the
adapter. Generation is serialized with a lock, because the adapter switch is model-wide state.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, cast

from covey.config import RunConfig, load_recipe
from covey.data.records import Record
from covey.errors import ConfigError

log = logging.getLogger("covey.serve")

ADAPTER_WEIGHTS = "adapter_model.safetensors"  # same names as covey.model.lora, without torch
ADAPTER_CONFIG = "adapter_config.json"
ROUND_RECORD = "round.json"
_LORA_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<part>[AB])\.weight$")


@dataclass
class GenerationSettings:
    """Decoding controls; the defaults are Shepherd's (temperature 0.1, top-p 0.75, top-k 40,
    4 beams, 128 new tokens). Temperature 0 means no sampling (greedy or plain beam search);
    Shepherd never turns sampling on, so there its temperature, top-p and top-k do nothing."""

    temperature: float = 0.1
    top_p: float = 0.75
    top_k: int = 40
    num_beams: int = 4
    max_new_tokens: int = 128
    seed: int | None = None
    """Seed the sampler before each answer: the same prompt and settings give the same answers,
    and the base and fine-tuned answers draw the same random numbers. None: fresh each time."""

    @property
    def streams(self) -> bool:
        """Tokens can be shown as they come only with one beam; beams finish together."""
        return self.num_beams == 1

    def check(self) -> None:
        problems = []
        if not self.temperature >= 0:
            problems.append(f"temperature must be >= 0 (got {self.temperature})")
        if not 0 < self.top_p <= 1:
            problems.append(f"top-p must be in (0, 1] (got {self.top_p})")
        if self.top_k < 0:
            problems.append(f"top-k must be >= 0, 0 meaning no limit (got {self.top_k})")
        if self.num_beams < 1:
            problems.append(f"beams must be at least 1 (got {self.num_beams})")
        if self.max_new_tokens < 1:
            problems.append(f"max new tokens must be at least 1 (got {self.max_new_tokens})")
        if problems:
            raise ConfigError("; ".join(problems))

    def generate_kwargs(self) -> dict[str, Any]:
        """Arguments for `model.generate`: sampling settings only when sampling."""
        kwargs: dict[str, Any] = {
            "num_beams": self.num_beams,
            "max_new_tokens": self.max_new_tokens,
            "do_sample": self.temperature > 0,
        }
        if self.temperature > 0:
            kwargs |= {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k}
        return kwargs


@dataclass(frozen=True)
class AdapterSource:
    """An adapter folder and the run settings that go with it (base model, template)."""

    cfg: RunConfig
    adapter_dir: Path
    label: str
    """What the UI and the CLI call it: `round 3` (also for final/), or the folder's name."""
    run_dir: Path | None = None
    """The run folder, when the adapter belongs to one (for its rounds and test set)."""
    round_index: int | None = None


def resolve_source(
    run: Path | None = None,
    round_index: int | None = None,
    base: str | None = None,
    adapter: Path | None = None,
    template: str | None = None,
    device: str | None = None,
) -> AdapterSource:
    """The adapter named by the command's flags, with every file check done (nothing loaded)."""
    if run is None and adapter is None:
        raise ConfigError(
            "name the adapter with --run RUN_DIR (a `covey train` output folder) or with "
            "--adapter ADAPTER_DIR (a PEFT adapter folder, with --base)"
        )
    if run is not None and adapter is not None:
        raise ConfigError("--run and --adapter exclude each other; choose one")
    if run is not None:
        source = _from_run(run, round_index)
    else:
        if round_index is not None:
            raise ConfigError("--round needs --run (a run folder holds the rounds)")
        assert adapter is not None
        source = _from_adapter(adapter, base)
    cfg = source.cfg
    if base is not None:
        cfg = replace(cfg, model=replace(cfg.model, base=base))
    if device is not None:
        cfg = replace(cfg, model=replace(cfg.model, device=device))
    if template is not None:
        cfg = replace(cfg, prompt=replace(cfg.prompt, template=template))  # type: ignore[arg-type]  # checked by PromptConfig
    return replace(source, cfg=cfg)


def _from_run(run: Path, round_index: int | None) -> AdapterSource:
    run = Path(run)
    if not run.is_dir():
        raise ConfigError(f"--run {run}: no such folder; pass the run.out folder of `covey train`")
    if not (run / "config.toml").is_file():
        raise ConfigError(
            f"--run {run}: not a Covey run folder (no config.toml); "
            "pass the run.out folder of `covey train`"
        )
    from covey.fed.checkpoint import complete_rounds, round_dir  # imports torch: after the above

    cfg = _rebase_paths(load_recipe(run / "config.toml"), run)
    rounds = complete_rounds(run)
    if round_index is not None:
        if round_index not in rounds:
            have = f"complete rounds: {_ranges(rounds)}" if rounds else "no complete round yet"
            raise ConfigError(f"--round {round_index}: run {run} has no such round; {have}")
        return AdapterSource(
            cfg, round_dir(run, round_index), f"round {round_index}", run, round_index
        )
    final = run / "final"
    if (final / ADAPTER_WEIGHTS).is_file() and (final / ADAPTER_CONFIG).is_file():
        index = _record_round(final)
        label = "final" if index is None else f"round {index}"
        return AdapterSource(cfg, final, label, run, index)
    if not rounds:
        raise ConfigError(f"--run {run}: no complete round yet; train first (`covey train`)")
    last = rounds[-1]
    return AdapterSource(cfg, round_dir(run, last), f"round {last}", run, last)


def _from_adapter(adapter: Path, base: str | None) -> AdapterSource:
    adapter = Path(adapter)
    for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
        if not (adapter / name).is_file():
            raise ConfigError(
                f"--adapter {adapter}: no {name}; pass a PEFT adapter folder "
                "(a run's final/ or round_<k>/)"
            )
    run_dir: Path | None = None
    if (adapter / "config.toml").is_file():  # a round or final/ folder of a run
        cfg = load_recipe(adapter / "config.toml")
        if (adapter.parent / "config.toml").is_file():
            run_dir = adapter.parent
            cfg = _rebase_paths(cfg, run_dir)
    else:
        cfg = RunConfig()
        recorded = _adapter_config(adapter).get("base_model_name_or_path")
        if base is None and (not isinstance(recorded, str) or _is_covey_id(recorded)):
            raise ConfigError(
                f"--adapter {adapter}: holds no config.toml naming its base model; "
                "pass --base (a model folder, .gguf file or hub id)"
            )
        if isinstance(recorded, str) and not _is_covey_id(recorded):
            cfg.model.base = recorded  # a PEFT adapter from elsewhere names its base
    return AdapterSource(cfg, adapter, adapter.name, run_dir, _record_round(adapter))


def _rebase_paths(cfg: RunConfig, run: Path) -> RunConfig:
    """Relative paths in a run's config are relative to where `covey train` ran.

    That folder is the run folder minus `run.out`'s parts; paths that exist from the current
    folder are kept as they are.
    """
    out = Path(cfg.run.out)
    origin: Path | None = None
    resolved = run.resolve()
    if not out.is_absolute() and resolved.parts[-len(out.parts) :] == out.parts:
        origin = resolved.parents[len(out.parts) - 1]

    def rebase(value: str) -> str:
        path = Path(value).expanduser()
        if origin is None or path.is_absolute() or path.exists() or value.startswith("pkg:"):
            return value
        return str(origin / path) if (origin / path).exists() else value

    return replace(
        cfg,
        model=replace(cfg.model, base=rebase(cfg.model.base)),
        data=replace(cfg.data, dir=rebase(cfg.data.dir)),
    )


def _ranges(values: list[int]) -> str:
    if values == list(range(values[0], values[-1] + 1)):
        return f"{values[0]}..{values[-1]}"
    return ", ".join(map(str, values))


def _record_round(folder: Path) -> int | None:
    try:
        value = json.loads((folder / ROUND_RECORD).read_text(encoding="utf-8")).get("round")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, int) else None


def _adapter_config(folder: Path) -> dict[str, Any]:
    try:
        config = json.loads((folder / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"{folder / ADAPTER_CONFIG}: unreadable ({e})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{folder / ADAPTER_CONFIG}: expected a JSON object")
    return config


def _is_covey_id(value: str) -> bool:
    """`covey train` records `gguf:<hash>`, `name@<config hash>` or `hub/id@revision`."""
    return value.startswith("gguf:") or "@" in value


def recorded_base_ids(adapter_dir: Path) -> list[str]:
    """The base-model ids an adapter records: safetensors metadata, then adapter_config.json."""
    from safetensors import safe_open

    ids = []
    try:
        with safe_open(str(adapter_dir / ADAPTER_WEIGHTS), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise ConfigError(f"{adapter_dir / ADAPTER_WEIGHTS}: not a readable adapter ({e})") from e
    if meta.get("base_model"):
        ids.append(meta["base_model"])
    recorded = _adapter_config(adapter_dir).get("base_model_name_or_path")
    if isinstance(recorded, str) and recorded:
        ids.append(recorded)
    return ids


def check_base_matches(source: AdapterSource) -> str:
    """Refuse an adapter that `covey train` recorded for another base; return the base's id.

    Adapters from elsewhere carry no Covey id (a plain path or hub id); for those only the shape
    check after loading applies.
    """
    from covey.model.loading import base_model_id

    expected = base_model_id(source.cfg.model)
    for recorded in recorded_base_ids(source.adapter_dir):
        if _is_covey_id(recorded) and recorded != expected:
            raise ConfigError(
                f"adapter {source.adapter_dir} was trained on base model {recorded}, but "
                f"model.base = {source.cfg.model.base!r} is {expected}; serve it with the base "
                "it was trained on (--base), or pick the matching run"
            )
    return expected


def check_adapter_shapes(model: Any, adapter_dir: Path) -> None:
    """Every LoRA tensor must name a layer of the base and fit its input and output sizes."""
    from safetensors import safe_open

    with safe_open(str(adapter_dir / ADAPTER_WEIGHTS), framework="pt") as f:
        shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}  # noqa: SIM118
    for key, shape in sorted(shapes.items()):
        match = _LORA_KEY.match(key)
        if match is None:
            continue  # other PEFT tensors (e.g. DoRA magnitudes) are PEFT's to check
        name, part = match.group("module"), match.group("part")
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ConfigError(
                f"adapter {adapter_dir} does not fit the base model: its tensor {key} adapts "
                f"layer {name}, which the base model lacks (made for another architecture?)"
            ) from None
        sizes = _linear_sizes(module)
        if sizes is None:
            continue
        fan_in, fan_out = sizes
        want, axis, what = (fan_in, 1, "inputs") if part == "A" else (fan_out, 0, "outputs")
        if len(shape) != 2 or shape[axis] != want:
            raise ConfigError(
                f"adapter {adapter_dir} does not fit the base model: {key} has shape "
                f"{list(shape)}, but layer {name} has {want} {what} (made for another base?)"
            )


def _linear_sizes(module: Any) -> tuple[int, int] | None:
    """(inputs, outputs) of a linear layer (nn.Linear and subclasses, or GPT-2's Conv1D)."""
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return int(module.in_features), int(module.out_features)
    if type(module).__name__ == "Conv1D":
        rows, cols = module.weight.shape
        return int(rows), int(cols)
    return None


@dataclass
class ServeSession:
    """The resident PEFT model and tokenizer; answers with the adapter on or off."""

    model: Any
    tokenizer: Any
    source: AdapterSource
    base_id: str
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def template(self) -> str:
        return self.source.cfg.prompt.template

    def prompt(self, instruction: str, context: str = "") -> str:
        """The training template applied to one instruction (and optional context)."""
        from covey.data.prompts import build_prompt

        record = Record(instruction=instruction, context=context, response="", category="", id=0)
        return build_prompt(record, self.template, self.tokenizer)

    def generate(
        self, instruction: str, context: str, settings: GenerationSettings, adapter: bool = True
    ) -> str:
        """One whole answer (base model when `adapter` is false)."""
        settings.check()
        with self._lock:
            ids = self._answer_ids(self.prompt(instruction, context), settings, adapter)
        return str(self.tokenizer.decode(ids, skip_special_tokens=True)).strip()

    def stream(
        self, instruction: str, context: str, settings: GenerationSettings, adapter: bool = True
    ) -> Iterator[str]:
        """The answer so far, growing token by token with one beam; with more, once at the end.
        Each value extends the previous one, except that the last is the whole answer stripped.

        `generate` runs in a thread feeding a `TextIteratorStreamer`; closing this iterator
        early stops that thread at the next token.
        """
        settings.check()
        if not settings.streams:
            yield self.generate(instruction, context, settings, adapter)
            return
        from transformers import StoppingCriteriaList, TextIteratorStreamer

        prompt = self.prompt(instruction, context)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        stop = threading.Event()
        failures: list[BaseException] = []

        def work() -> None:
            try:
                criteria = StoppingCriteriaList([_StopWhenSet(stop)])
                self._answer_ids(
                    prompt, settings, adapter, streamer=streamer, stopping_criteria=criteria
                )
            except BaseException as e:  # handed to the reading side
                failures.append(e)
                cast(Any, streamer).end()  # untyped in transformers

        with self._lock:
            thread = threading.Thread(target=work, name="covey-generate", daemon=True)
            thread.start()
            text, shown = "", ""
            try:
                for piece in streamer:
                    text += piece
                    if text.lstrip() != shown:
                        shown = text.lstrip()
                        yield shown
            finally:
                stop.set()
                thread.join()
        if failures:
            raise failures[0]
        if text.strip() != shown:
            yield text.strip()

    def answer_ids(self, prompt: str, settings: GenerationSettings, adapter: bool = True) -> Any:
        """Token ids answering an already templated `prompt` (without the prompt's ids)."""
        settings.check()
        with self._lock:
            return self._answer_ids(prompt, settings, adapter)

    def _answer_ids(
        self, prompt: str, settings: GenerationSettings, adapter: bool, **extra: Any
    ) -> Any:
        import torch

        device = next(self.model.parameters()).device
        encoded = self.tokenizer(
            prompt, return_tensors="pt", add_special_tokens=self.template != "chat"
        )
        ids = encoded["input_ids"].to(device)
        if settings.seed is not None:
            torch.manual_seed(settings.seed)
        switch = contextlib.nullcontext() if adapter else self.model.disable_adapter()
        with torch.no_grad(), switch:
            output = self.model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                pad_token_id=self.tokenizer.pad_token_id,
                **settings.generate_kwargs(),
                **extra,
            )
        return output[0, ids.shape[1] :]


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
    """Check the adapter against its base, load the base once, and put the adapter on it."""
    from peft import PeftModel

    from covey.data.prompts import check_template
    from covey.model.loading import load_base_model

    base_id = check_base_matches(source)
    model, tokenizer = load_base_model(source.cfg.model)
    check_template(source.cfg.prompt.template, tokenizer)
    check_adapter_shapes(model, source.adapter_dir)
    try:
        peft_model = PeftModel.from_pretrained(model, str(source.adapter_dir))
    except (RuntimeError, ValueError, KeyError) as e:
        raise ConfigError(
            f"adapter {source.adapter_dir}: PEFT cannot load it onto the base ({e})"
        ) from e
    peft_model.train(False)
    log.info("serving %s of %s on %s", source.label, source.cfg.model.base, base_id)
    return ServeSession(peft_model, tokenizer, source, base_id)
