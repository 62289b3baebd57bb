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
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from covey.config import DataConfig, RunConfig, RunSettings, load_recipe_text, to_toml
from covey.errors import DataError
from covey.flock.task import TOKEN_UNIT, TaskParams

FORMAT = "covey-task/1"


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
        try:
            tree = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataError(f"{where}: not a Covey task bundle (not JSON: {e})") from None
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
        """The bundle's recipe as a checked config."""
        return load_recipe_text(self.recipe, f"{where} recipe")


def bundle_recipe(cfg: RunConfig) -> str:
    """The recipe a bundle carries: every shared setting; where data and outputs live is each
    participant's own business, so those are left at their defaults."""
    return to_toml(replace(cfg, data=DataConfig(), run=RunSettings(seed=cfg.run.seed)))


def task_params(
    cfg: RunConfig, min_participants: int, max_participants: int, windows: dict[str, int]
) -> TaskParams:
    """The contract's parameters from the recipe's [fed] and [flock] sections (tokens to wei)
    and phase windows in blocks (`covey.flock.task.phase_windows`)."""
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
