"""`covey export`: a merged model that plain transformers loads and that equals base + adapter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase
from typer.testing import CliRunner

from covey.cli import app
from covey.errors import ConfigError
from covey.serve.adapters import resolve_source
from covey.serve.export import EXPORT_RECORD, export_merged

IDS = torch.tensor([[1, 72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100, 2]])


def test_merged_export_loads_in_plain_transformers_and_matches_base_plus_adapter(
    tiny_run: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "merged"
    result = export_merged(resolve_source(run=tiny_run), out)
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert result.out == out and result.parameters == merged.num_parameters()
    assert result.parameters == sum(p.numel() for p in merged.parameters())  # no LoRA left
    assert type(merged).__name__ == "LlamaForCausalLM"
    weights = load_file(out / "model.safetensors")
    assert not [k for k in weights if "lora" in k]
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        plain = base(input_ids=IDS).logits
        reference = PeftModel.from_pretrained(base, tiny_run / "final")(input_ids=IDS).logits
        exported = merged(input_ids=IDS).logits
    assert not torch.allclose(plain, reference, atol=1e-4)  # the adapter matters
    torch.testing.assert_close(exported, reference, atol=1e-5, rtol=1e-4)

    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    record = json.loads((out / EXPORT_RECORD).read_text())
    assert record["round"] == 2 and record["prompt_template"] == "chat"
    assert (
        record["adapter_sha256"]
        == json.loads((tiny_run / "final" / "round.json").read_text())["adapter_sha256"]
    )


def test_export_refuses_a_non_empty_folder_before_loading(tiny_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="--overwrite"):
        export_merged(resolve_source(run=tiny_run), out)
    assert (out / "keep.txt").read_text() == "mine"


def test_a_failed_export_leaves_nothing_and_keeps_the_previous_one(
    tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "merged"
    out.mkdir()
    (out / "previous.txt").write_text("old export")

    def broken(self: object, *args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", broken)
    with pytest.raises(OSError, match="disk full"):
        export_merged(resolve_source(run=tiny_run), out, overwrite=True)
    assert [p.name for p in out.iterdir()] == ["previous.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]  # no staging folder left


def test_export_command_merges_the_chosen_round(tiny_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "round1"
    result = CliRunner().invoke(
        app, ["export", "--run", str(tiny_run), "--round", "1", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert "round 1 merged into" in result.output
    assert json.loads((out / EXPORT_RECORD).read_text())["round"] == 1
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
