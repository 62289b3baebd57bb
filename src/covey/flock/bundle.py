"""The task bundle: what every participant of a FLock task must agree on, named by one CID.

The creator publishes it and records its CID on chain; `covey flock join TASK` reads the CID
from the contract, fetches the bundle, checks it, and trains exactly what everyone else trains:

    {
      "format": "covey-task/1",
      "recipe": "<TOML>",              the run's settings (model, lora, prompt, train, fed,
                                       eval, flock); data.dir and run.out are each party's own
      "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct",   how the creator named the base
      "base_weights_sha256": "<hex>",  the base model's tensors, as `weights_sha256` hashes them
      "initial_adapter": "bafkrei..."  CID of round 0's adapter (safetensors): everyone starts
                                       from the same LoRA initialization
    }

The bundle is canonical JSON (sorted keys, no spaces), so the same task has the same CID on
every machine. It is parsed as JSON and checked field by field; nothing in it is executed or
unpickled. `task_params` turns the same recipe into the contract's parameters.

The creator is a peer like any other, so a participant reads a bundle under hard limits:
`MAX_BUNDLE_BYTES` and a flat JSON object, the recipe's TOML within `MAX_RECIPE_BYTES`, nested
at most `RECIPE_DEPTH` deep (`covey.store.bounded`: no nesting can overflow the stack), and a
training budget within `BUDGET_CAPS`, so that no bundle can make it train or score for days
(and miss its deadlines). Where a participant reads and writes is its own business: the paths
a recipe names (model.cache_dir, data.dir, run.out, and run.report_to's trackers) are reset to
the participant's defaults with a warning, and a model.base that names a path on the
participant's machine is never read: the participant passes its own `--base`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from covey.config import (
    DataConfig,
    RunConfig,
    RunSettings,
    flatten,
    load_recipe_text,
    to_toml,
)
from covey.errors import ConfigError, DataError
from covey.flock.params import TOKEN_UNIT, TaskParams
from covey.store.bounded import loads_json, loads_toml

log = logging.getLogger("covey.flock")

FORMAT = "covey-task/1"

MAX_BUNDLE_BYTES = 64 * 1024
"""A bundle is its recipe (about 3 kB) and three short strings; 64 KiB is over 10x that."""
MAX_RECIPE_BYTES = 32 * 1024
"""`to_toml` writes every setting of a recipe in about 3 kB."""
BUNDLE_DEPTH = 2
"""A bundle is one flat object (depth 1); one level more lets the field checks name a field
that holds an object or a list instead of a string."""
RECIPE_DEPTH = 4
"""A recipe's tree is three deep (the document, a [section], a list such as
lora.target_modules); one level of slack."""
RECIPE_KEY_PARTS = 4
"""`section.key` has two parts."""

BUDGET_CAPS: dict[str, int] = {
    "train.epochs": 20,  # Shepherd's recipe runs 10 local epochs per round; Covey's default 1
    "train.max_steps": 10_000,  # optimizer steps per round (0, no cap, is left to epochs)
    "train.batch_size": 4_096,
    "train.micro_batch_size": 256,  # examples per forward pass: memory
    "prompt.cutoff_len": 8_192,  # tokens per example: memory (SmolLM2's and Llama 3's context)
    "lora.r": 256,  # 4x QLoRA's 64; the adapter a participant trains and every peer fetches
    "lora.target_modules": 64,  # modules named (a list: its length)
    "flock.validation_examples": 4_096,  # each voter scores every proposal on these
    "flock.proposers_per_round": 64,  # proposals each voter scores per round
    "eval.batch_size": 256,  # examples per scoring forward pass: memory
    "eval.max_new_tokens": 2_048,
    "eval.rouge_max_new_tokens": 2_048,
    "eval.sample_instructions": 64,
    "eval.rouge_examples": 1_000,
}
"""The most of each cost a participant accepts from a task bundle's recipe (a list setting: its
length): far above what any task Covey runs asks (the demo trains a few steps a round), and a
bound on what a creator can make participants spend; one kept busy past a phase window is
slashed as a no-show. How long a round takes still depends on each participant's own data."""

UNREAD_BASE = "unread-bundle-path:"
"""Put before a model.base from a bundle that names a path on this machine: nothing loads it,
and `bundle_base_path` tells `task_model` to ask for --base instead."""
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}(/[A-Za-z0-9][\w.-]{0,95})?", re.ASCII)
_PACKAGE_FILE = re.compile(r"pkg:[A-Za-z_]\w*/[A-Za-z0-9][\w.-]*", re.ASCII)


@dataclass(frozen=True)
class TaskBundle:
    recipe: str
    base_model: str
    base_weights_sha256: str
    initial_adapter: str
    format: str = FORMAT

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, data: bytes, where: str = "task bundle") -> TaskBundle:
        """Parse and check a fetched bundle; DataError naming the field otherwise."""
        tree = loads_json(data, what=where, max_bytes=MAX_BUNDLE_BYTES, max_depth=BUNDLE_DEPTH)
        if not isinstance(tree, dict) or tree.get("format") != FORMAT:
            got = tree.get("format") if isinstance(tree, dict) else type(tree).__name__
            raise DataError(f"{where}: format {got!r} is not {FORMAT!r}")
        fields: dict[str, Any] = {}
        for name in ("recipe", "base_model", "base_weights_sha256", "initial_adapter"):
            value = tree.get(name)
            if not isinstance(value, str) or not value:
                raise DataError(f"{where}: field {name!r} is missing or not a string")
            fields[name] = value
        unknown = sorted(set(tree) - {*fields, "format"})
        if unknown:
            raise DataError(f"{where}: unknown field {unknown[0]!r}")
        return cls(**fields)

    def config(self, where: str = "task bundle") -> RunConfig:
        """The bundle's recipe as a checked config, within `BUDGET_CAPS`, with the paths it
        names reset to this participant's defaults (logged); DataError naming the problem."""
        what = f"{where} recipe"
        # checked under the limits first; load_recipe_text parses the (small) text again
        loads_toml(
            self.recipe,
            what=what,
            max_bytes=MAX_RECIPE_BYTES,
            max_depth=RECIPE_DEPTH,
            max_key_parts=RECIPE_KEY_PARTS,
        )
        try:
            cfg = load_recipe_text(self.recipe, what)
        except ConfigError as e:  # the creator's recipe, not this participant's settings
            raise DataError(str(e)) from None
        over = over_budget(cfg)
        if over:
            raise DataError(
                f"{what}: {over[0]}, over the most a participant accepts from a task bundle "
                "(covey.flock.bundle.BUDGET_CAPS); ask the task's creator to lower it"
            )
        return _own_paths(cfg, what)


def over_budget(cfg: RunConfig) -> list[str]:
    """`key = value` and the cap, for each setting of `cfg` over `BUDGET_CAPS`."""
    flat = flatten(cfg.to_dict())
    over = []
    for key, cap in BUDGET_CAPS.items():
        value = flat[key]
        size = len(value) if isinstance(value, list) else value
        if size > cap:
            shown = f"{len(value)} entries" if isinstance(value, list) else repr(value)
            over.append(f"{key} = {shown} is over the cap of {cap:,}")
    return over


def names_local_path(base: str) -> bool:
    """Whether a model.base would make a participant read its own files: anything but a hub id
    (`name` or `owner/name`) that names nothing here, or `pkg:PACKAGE/FILE` for a plain file
    in a top-level installed package (a dotted package would be imported to be found)."""
    if ".." in base:
        return True
    if _PACKAGE_FILE.fullmatch(base):
        return False
    hub_id = _HUB_ID.fullmatch(base) is not None and not base.lower().endswith(".gguf")
    return not hub_id or Path(base).expanduser().exists()


def bundle_base_path(cfg: RunConfig) -> str | None:
    """The path a bundle's model.base named, when `TaskBundle.config` left it unread and no
    --base replaced it; None otherwise."""
    base = cfg.model.base
    return base[len(UNREAD_BASE) :] if base.startswith(UNREAD_BASE) else None


def _own_paths(cfg: RunConfig, what: str) -> RunConfig:
    """`cfg` with every path (and tracker) it names reset to this participant's defaults."""
    ignored: list[str] = []
    model = cfg.model
    if model.cache_dir is not None:
        ignored.append(f"model.cache_dir = {model.cache_dir!r}")
        model = replace(model, cache_dir=None)
    if names_local_path(model.base):
        ignored.append(f"model.base = {model.base!r} (a path: pass --base with your copy)")
        model = replace(model, base=UNREAD_BASE + model.base)
    data, run = DataConfig(), RunSettings(seed=cfg.run.seed)
    if cfg.data.dir != data.dir:
        ignored.append(f"data.dir = {cfg.data.dir!r}")
    if cfg.run.out != run.out:
        ignored.append(f"run.out = {cfg.run.out!r}")
    if cfg.run.report_to:
        ignored.append(f"run.report_to = {cfg.run.report_to!r}")
    if ignored:
        log.warning(
            "%s: ignored %s: where a participant reads and writes is its own", what,
            "; ".join(ignored),
        )  # fmt: skip
    return replace(cfg, model=model, data=data, run=run)


def bundle_recipe(cfg: RunConfig) -> str:
    """The recipe a bundle carries: every shared setting; where data, caches and outputs live
    is each participant's own business, so those are left at their defaults. ConfigError if
    the recipe asks for more than participants accept (`BUDGET_CAPS`)."""
    over = over_budget(cfg)
    if over:
        raise ConfigError(
            f"{over[0]} that participants accept from a task bundle "
            "(covey.flock.bundle.BUDGET_CAPS): lower it"
        )
    shared = replace(
        cfg,
        model=replace(cfg.model, cache_dir=None),
        data=DataConfig(),
        run=RunSettings(seed=cfg.run.seed),
    )
    return to_toml(shared)


def task_params(
    cfg: RunConfig, min_participants: int, max_participants: int, windows: dict[str, int]
) -> TaskParams:
    """The contract's parameters from the recipe's [fed] and [flock] sections (tokens to wei)
    and phase windows in blocks (`covey.flock.params.phase_windows`)."""
    flock = cfg.flock
    return TaskParams(
        rounds=cfg.fed.rounds,
        min_participants=min_participants,
        max_participants=max_participants,
        stake=int(flock.stake * TOKEN_UNIT),
        reward_pool=int(flock.reward_pool * TOKEN_UNIT),
        proposers_per_round=flock.proposers_per_round,
        voters_per_round=flock.voters_per_round,
        slash_pct=flock.slash_pct,
        no_show_pct=flock.no_show_pct,
        threshold_pct=flock.threshold_pct,
        voter_reward_pct=flock.voter_reward_pct,
        keeper_fee=int(flock.keeper_fee * TOKEN_UNIT),
        max_missed_rounds=flock.max_missed_rounds,
        **windows,
    )


def weights_sha256(model: Any) -> str:
    """sha256 over the base model's tensors (name, shape, float32 bytes, in name order).

    Float32 makes the hash independent of the dtype a participant loads in when the weights
    are exactly representable (bf16 or fp16 checkpoints); a base quantized or rounded
    differently gives another hash, which is the point. A model already wrapped with LoRA
    (PEFT) hashes as the model it wraps: adapter tensors are left out and PEFT's
    `base_layer.` renaming undone.
    """
    digest = hashlib.sha256()
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    state = {
        name.replace(".base_layer.", "."): tensor
        for name, tensor in model.state_dict().items()
        if "lora_" not in name
    }
    for name in sorted(state):
        tensor = state[name].detach().to("cpu", torch.float32).contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()
