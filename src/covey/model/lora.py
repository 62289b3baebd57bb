"""LoRA through PEFT: wrap a base model, and move adapters in and out as plain state dicts.

Adapters cross every boundary (client/server, disk, network, chain) as `State`: the dict that
PEFT's `get_peft_model_state_dict` returns, with PEFT's own key names, so a saved round loads
with `peft.PeftModel.from_pretrained`. The base model stays resident; swapping a client's
adapter in is a copy into the existing LoRA parameters.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from peft import set_peft_model_state_dict as _set_state
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

from covey.config import LoraSettings
from covey.errors import ConfigError
from covey.state import State
from covey.store.updates import serialize_update

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def default_target_modules(model: Any) -> list[str] | str:
    """PEFT's per-architecture default (q_proj, v_proj for Llama), else every linear layer."""
    model_type = str(getattr(model.config, "model_type", ""))
    defaults = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type)
    return list(defaults) if defaults else "all-linear"


def lora_config(model: Any, settings: LoraSettings) -> LoraConfig:
    if settings.r < 1:
        raise ConfigError(f"lora.r must be at least 1 (got {settings.r})")
    if not 0 <= settings.dropout < 1:
        raise ConfigError(f"lora.dropout must be in [0, 1) (got {settings.dropout})")
    targets = settings.target_modules or default_target_modules(model)
    return LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
    )


def wrap_with_lora(model: Any, settings: LoraSettings) -> PeftModel:
    """Add a fresh LoRA adapter (A random, B zero: the wrapped model equals the base)."""
    config = lora_config(model, settings)
    try:
        return get_peft_model(model, config)
    except ValueError as e:
        names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if _is_linear(m)})
        raise ConfigError(
            f"lora.target_modules {config.target_modules}: {e}. "
            f"Linear layers in this model: {', '.join(names)}"
        ) from None


def adapter_state(model: PeftModel) -> State:
    """A detached copy of the adapter weights (PEFT key names, no adapter name)."""
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


def load_adapter_state(model: PeftModel, state: State) -> None:
    """Copy `state` into the model's adapter in place; every key must match."""
    result = _set_state(model, state)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ValueError(f"adapter keys not in the model: {unexpected[:3]}")


def adapter_files(model: PeftModel, state: State, base_model_id: str) -> dict[str, bytes]:
    """The bytes of a PEFT-loadable adapter folder for `state`: weights and adapter_config.json.

    Both are the same for the same state in every process (the weights' hash is the adapter's
    identity). `base_model_name_or_path` is what transformers can load: the hub id or the local
    folder the base came from (for a GGUF file, its dequantized safetensors cache), so
    `AutoPeftModelForCausalLM.from_pretrained(folder)` works. Covey's own identity of the base,
    `base_model_id`, is in the safetensors metadata, where serving checks it before loading.
    """
    config = model.peft_config["default"].to_dict()
    loaded_from = config.get("base_model_name_or_path")
    if isinstance(loaded_from, str) and Path(loaded_from).exists():
        config["base_model_name_or_path"] = str(Path(loaded_from).resolve())
    for key, value in config.items():  # sets (e.g. target_modules) are not JSON
        if isinstance(value, set):
            config[key] = sorted(value)
    weights = serialize_update(state, {"format": "pt", "base_model": base_model_id})
    text = json.dumps(config, indent=2, sort_keys=True, default=str) + "\n"
    return {ADAPTER_WEIGHTS: weights, ADAPTER_CONFIG: text.encode()}


def _is_linear(module: Any) -> bool:
    return isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"
