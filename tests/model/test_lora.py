"""Adapter files: the same bytes for the same state everywhere, loadable by plain PEFT."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from peft import AutoPeftModelForCausalLM, PeftModel
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from covey.config import LoraSettings, ModelConfig
from covey.model.loading import base_model_id, load_base_model
from covey.model.lora import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    adapter_files,
    adapter_state,
    wrap_with_lora,
)
from covey.store.updates import serialize_update
from tests.model.tiny import make_tiny_gguf

REPO = Path(__file__).resolve().parents[2]
IDS = torch.tensor([[1, 72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100, 2]])
# Enough keys that a hash map's per-process order would show (8! orders).
METADATA = {k: f"value of {k}" for k in ("round", "proposer", "format", "zeta", "alpha", "b", "c")}


def trained_lora(cfg: ModelConfig) -> tuple[Any, dict[str, torch.Tensor]]:
    """The base wrapped with LoRA whose matrices are seeded noise (a fresh B is zero), and its
    adapter state."""
    model, _ = load_base_model(cfg)
    peft_model = wrap_with_lora(model, LoraSettings(r=4, alpha=8, dropout=0.0))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    return peft_model, adapter_state(peft_model)


def adapter_hashes(model_dir: str, reverse: bool) -> str:
    """sha256 of `adapter_files` (weights, config) and of `serialize_update`, with every dict
    built in forward or reverse key order; run in fresh processes by the test below."""
    peft_model, state = trained_lora(ModelConfig(base=model_dir))
    order = list(reversed(state)) if reverse else list(state)
    state = {k: state[k] for k in order}
    metadata = dict(reversed(METADATA.items())) if reverse else dict(METADATA)
    files = adapter_files(peft_model, state, base_model_id(ModelConfig(base=model_dir)))
    parts = [files[ADAPTER_WEIGHTS], files[ADAPTER_CONFIG], serialize_update(state, metadata)]
    return " ".join(hashlib.sha256(p).hexdigest() for p in parts)


def test_the_same_adapter_gives_the_same_bytes_in_every_process(tiny_model_dir: Path) -> None:
    """FLock names adapters by CID and checkpoints record their sha256: the bytes must not
    depend on the process (safetensors writes its metadata from a hash map)."""
    code = (
        "import sys; from tests.model.test_lora import adapter_hashes; "
        "print(adapter_hashes(sys.argv[1], sys.argv[2] == 'reverse'))"
    )
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)])}
    children = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(tiny_model_dir), order],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
            env=env,
        )
        for order in ("forward", "reverse")
    ]
    outputs = []
    for child in children:
        out, err = child.communicate(timeout=300)
        assert child.returncode == 0, err
        outputs.append(out.strip().splitlines()[-1])
    here = adapter_hashes(str(tiny_model_dir), reverse=False)
    assert outputs == [here, here]


def test_update_bytes_have_sorted_metadata_and_load_back() -> None:
    state = {"b.lora_B.weight": torch.ones(2, 3), "a.lora_A.weight": torch.arange(6.0).view(3, 2)}
    data = serialize_update(state, METADATA)
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    assert list(header["__metadata__"]) == sorted(METADATA)
    assert (8 + int.from_bytes(data[:8], "little")) % 8 == 0  # tensor data stays aligned
    from safetensors.torch import load

    back = load(data)
    assert all(torch.equal(back[k], state[k]) for k in state)


def _round_trip(peft_model: Any, cfg: ModelConfig, folder: Path) -> None:
    """Write the adapter folder as the engine does, then load it with PEFT's two entry points."""
    folder.mkdir()
    files = adapter_files(peft_model, adapter_state(peft_model), base_model_id(cfg))
    for name, data in files.items():
        (folder / name).write_bytes(data)
    with torch.no_grad():
        expected = peft_model(input_ids=IDS).logits

    auto = AutoPeftModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    recorded = json.loads((folder / ADAPTER_CONFIG).read_text())["base_model_name_or_path"]
    plain = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(recorded, dtype=torch.float32), folder
    )
    with torch.no_grad():
        torch.testing.assert_close(auto(input_ids=IDS).logits, expected)
        torch.testing.assert_close(plain(input_ids=IDS).logits, expected)
    with safe_open(str(folder / ADAPTER_WEIGHTS), framework="pt") as f:
        assert f.metadata()["base_model"] == base_model_id(cfg)  # Covey's identity of the base


def test_an_adapter_of_a_folder_model_loads_with_auto_peft(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    cfg = ModelConfig(base=str(tiny_model_dir))
    peft_model, _ = trained_lora(cfg)
    _round_trip(peft_model, cfg, tmp_path / "adapter")
    recorded = json.loads((tmp_path / "adapter" / ADAPTER_CONFIG).read_text())
    assert recorded["base_model_name_or_path"] == str(tiny_model_dir.resolve())


def test_an_adapter_of_a_gguf_model_names_its_safetensors_cache(tmp_path: Path) -> None:
    gguf = make_tiny_gguf(tmp_path / "tiny.gguf")
    cfg = ModelConfig(base=str(gguf), cache_dir=str(tmp_path / "cache"))
    peft_model, _ = trained_lora(cfg)
    _round_trip(peft_model, cfg, tmp_path / "adapter")
    recorded = json.loads((tmp_path / "adapter" / ADAPTER_CONFIG).read_text())
    from covey.model.loading import gguf_cache_dir

    assert recorded["base_model_name_or_path"] == str(gguf_cache_dir(gguf, cfg.cache_dir))
    assert base_model_id(cfg).startswith("gguf:")


def test_adapter_config_json_is_key_sorted(tiny_model_dir: Path) -> None:
    peft_model, state = trained_lora(ModelConfig(base=str(tiny_model_dir)))
    config = json.loads(adapter_files(peft_model, state, "x@0")[ADAPTER_CONFIG])
    assert list(config) == sorted(config)
