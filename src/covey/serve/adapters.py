"""Which adapter to serve, whether it fits its base, and loading it onto the base.

An adapter comes from a run folder (`--run RUN [--round K]`: `final/` or `round_<K>/`, with the
run's `config.toml` for the base model and prompt template) or from a bare adapter folder
(`--adapter DIR`, with `--base` when its `adapter_config.json` names no loadable base). Every
check that can fail runs before the base model is loaded or a server starts: the folder and
round exist, the adapter was made for this base (the id `covey train` records in the weights'
metadata), and its tensors fit the base's layers.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from covey.config import ModelConfig, RunConfig, load_recipe
from covey.errors import ConfigError

log = logging.getLogger("covey.serve")

ADAPTER_WEIGHTS = "adapter_model.safetensors"  # same names as covey.model.lora, without torch
ADAPTER_CONFIG = "adapter_config.json"
ROUND_RECORD = "round.json"
_LORA_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<part>[AB])\.weight$")


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
    from covey.fed.runfolder import complete_rounds, round_dir  # imports torch: after the above

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
            cfg.model.base = recorded  # PEFT's adapter_config.json names a loadable base
    return AdapterSource(cfg, adapter, adapter.name, run_dir, _record_round(adapter))


def _rebase_paths(cfg: RunConfig, run: Path) -> RunConfig:
    """Relative paths in a run's config are relative to where `covey train` ran, never to the
    current folder (which may hold another run's `data/`).

    That folder is found from the run folder: as many levels above it as `run.out` has parts
    (`runs/demo/train` ran two levels above `train/`). With an absolute `run.out` it is unknown,
    and the run folder itself stands in. A relative `model.base` is taken from there only when
    it exists there: otherwise it may be a hub id (`owner/name`).
    """
    out = Path(cfg.run.out)
    resolved = run.resolve()
    origin = resolved
    if not out.is_absolute() and len(resolved.parts) > len(out.parts):
        origin = resolved.parents[len(out.parts) - 1]

    def rebase(value: str, must_exist: bool) -> str:
        path = Path(value).expanduser()
        if path.is_absolute() or value.startswith("pkg:"):
            return value
        if must_exist and not (origin / path).exists():
            return value
        return str(origin / path)

    return replace(
        cfg,
        model=replace(cfg.model, base=rebase(cfg.model.base, must_exist=True)),
        data=replace(cfg.data, dir=rebase(cfg.data.dir, must_exist=False)),
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
    """`covey train` records `gguf:<hash>`, `name@<config hash>` or `hub/id@revision` (older
    runs also in adapter_config.json, where transformers cannot resolve them)."""
    return value.startswith("gguf:") or "@" in value


def recorded_base_ids(adapter_dir: Path) -> list[str]:
    """The Covey base-model ids an adapter records: safetensors metadata, then (older runs)
    adapter_config.json."""
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
    if isinstance(recorded, str) and _is_covey_id(recorded):
        ids.append(recorded)
    return ids


def check_base_matches(source: AdapterSource) -> str:
    """Refuse an adapter that `covey train` recorded for another base; return the base's id.

    Adapters from elsewhere carry no Covey id; for those only the shape check after loading
    applies.
    """
    from covey.model.loading import base_model_id

    expected = base_model_id(source.cfg.model)
    for recorded in recorded_base_ids(source.adapter_dir):
        if recorded != expected:
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


@dataclass(frozen=True)
class LoadedAdapter:
    """The base model with the adapter on it (a PEFT model, in eval mode), and its tokenizer."""

    model: Any
    tokenizer: Any
    base_id: str


def load_adapter(source: AdapterSource, model_cfg: ModelConfig | None = None) -> LoadedAdapter:
    """Check the adapter against its base, load the base once, and put the adapter on it.

    `model_cfg` replaces the run's `[model]` settings (export loads the base unquantized).
    """
    from peft import PeftModel

    from covey.model.loading import load_base_model

    base_id = check_base_matches(source)
    model, tokenizer = load_base_model(model_cfg or source.cfg.model)
    check_adapter_shapes(model, source.adapter_dir)
    try:
        peft_model = PeftModel.from_pretrained(model, str(source.adapter_dir))
    except (RuntimeError, ValueError, KeyError) as e:
        raise ConfigError(
            f"adapter {source.adapter_dir}: PEFT cannot load it onto the base ({e})"
        ) from e
    peft_model.train(False)
    log.info("loaded %s of %s on %s", source.label, source.cfg.model.base, base_id)
    return LoadedAdapter(peft_model, tokenizer, base_id)
