"""Choosing the adapter, refusing ones that do not fit, and answers with the adapter on and off."""

from __future__ import annotations

import itertools
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from covey.errors import ConfigError
from covey.serve.commands import app
from covey.serve.generate import (
    GenerationSettings,
    ServeSession,
    load_session,
    resolve_source,
)

GREEDY = GenerationSettings(temperature=0.0, num_beams=1, max_new_tokens=6)


# --- which adapter ----------------------------------------------------------------------------


def test_a_run_serves_final_with_the_runs_template(tiny_run: Path) -> None:
    source = resolve_source(run=tiny_run)
    assert source.adapter_dir == tiny_run / "final"
    assert source.label == "round 2" and source.round_index == 2 and source.run_dir == tiny_run
    assert source.cfg.prompt.template == "chat"


def test_round_picks_that_rounds_folder(tiny_run: Path) -> None:
    source = resolve_source(run=tiny_run, round_index=1)
    assert source.adapter_dir == tiny_run / "round_001" and source.label == "round 1"


def test_an_adapter_folder_inside_a_run_finds_its_run(tiny_run: Path) -> None:
    source = resolve_source(adapter=tiny_run / "round_001", template="alpaca")
    assert source.run_dir == tiny_run and source.round_index == 1
    assert source.cfg.prompt.template == "alpaca"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"run": Path("no/such/run")}, "no such folder"),
        ({}, "name the adapter with --run"),
        ({"adapter": Path("no/such/adapter")}, "no adapter_model.safetensors"),
    ],
)
def test_bad_flags_are_config_errors(kwargs: dict[str, Path], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        resolve_source(**kwargs)  # type: ignore[arg-type]


def test_run_and_adapter_together_and_round_without_run_are_refused(tiny_run: Path) -> None:
    with pytest.raises(ConfigError, match="exclude each other"):
        resolve_source(run=tiny_run, adapter=tiny_run / "final")
    with pytest.raises(ConfigError, match="--round needs --run"):
        resolve_source(adapter=tiny_run / "final", round_index=1)


def test_a_folder_that_is_not_a_run_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a Covey run folder"):
        resolve_source(run=tmp_path)


def test_a_missing_round_names_the_rounds_there(tiny_run: Path) -> None:
    with pytest.raises(ConfigError, match=r"no such round; complete rounds: 0\.\.2"):
        resolve_source(run=tiny_run, round_index=7)


def test_relative_paths_are_read_from_where_training_ran(
    tiny_run: Path,
    tiny_model_dir: Path,
    client_data_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`covey train` ran in work/ with run.out = runs/x, model.base = models/tiny: serving from
    elsewhere must still find the base and the test set."""
    work = tmp_path / "work"
    shutil.copytree(tiny_run, work / "runs" / "x")
    shutil.copytree(tiny_model_dir, work / "models" / "tiny")
    shutil.copytree(client_data_dir, work / "data")
    config = (work / "runs" / "x" / "config.toml").read_text()
    config = config.replace(f'"{tiny_model_dir}"', '"models/tiny"')
    config = config.replace(f'"{client_data_dir}"', '"data"').replace(f'"{tiny_run}"', '"runs/x"')
    (work / "runs" / "x" / "config.toml").write_text(config)
    monkeypatch.chdir(tmp_path)
    source = resolve_source(run=Path("work/runs/x"))
    assert Path(source.cfg.model.base) == (work / "models" / "tiny").resolve()
    assert Path(source.cfg.data.dir) == (work / "data").resolve()


def _bare_adapter(tiny_run: Path, folder: Path, base_name: str) -> Path:
    """The final adapter's two PEFT files alone, as another tool would ship them."""
    folder.mkdir()
    shutil.copy(tiny_run / "final" / "adapter_model.safetensors", folder)
    config = json.loads((tiny_run / "final" / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = base_name
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def test_a_bare_adapter_needs_base_unless_its_config_names_one(
    tiny_run: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    covey_made = _bare_adapter(tiny_run, tmp_path / "a", "tiny@0123456789abcdef")
    with pytest.raises(ConfigError, match="pass --base"):
        resolve_source(adapter=covey_made)
    source = resolve_source(adapter=covey_made, base=str(tiny_model_dir))
    assert source.cfg.model.base == str(tiny_model_dir) and source.run_dir is None
    assert source.cfg.prompt.template == "alpaca"  # Shepherd's, unless --template says otherwise
    foreign = _bare_adapter(tiny_run, tmp_path / "b", str(tiny_model_dir))
    assert resolve_source(adapter=foreign).cfg.model.base == str(tiny_model_dir)


# --- adapters that do not fit -----------------------------------------------------------------


def _rewrite_weights(folder: Path, edit: object) -> None:
    """Apply `edit(state) -> state` to an adapter's weights, keeping its metadata."""
    path = folder / "adapter_model.safetensors"
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    state = edit(load_file(path))  # type: ignore[operator]
    save_file(state, path, metadata=metadata)


def test_an_adapter_for_another_base_is_refused_before_loading(run_copy: Path) -> None:
    final = run_copy / "final"
    _rewrite_weights(final, lambda s: s)
    with safe_open(str(final / "adapter_model.safetensors"), framework="pt") as f:
        metadata = dict(f.metadata())
    metadata["base_model"] = "SomeOtherModel@0123456789abcdef"
    save_file(load_file(final / "adapter_model.safetensors"), final / "adapter_model.safetensors",
              metadata=metadata)  # fmt: skip
    with pytest.raises(ConfigError, match="trained on base model SomeOtherModel@0123456789abcdef"):
        load_session(resolve_source(run=run_copy))


def test_a_different_base_given_with_base_is_refused(tiny_run: Path, tmp_path: Path) -> None:
    from tests.model.tiny import make_tiny_model_dir

    other = make_tiny_model_dir(tmp_path / "other", pad_token=False)  # another config.json
    with pytest.raises(ConfigError, match="serve it with the base it was trained on"):
        load_session(resolve_source(run=tiny_run, base=str(other)))


def test_the_adapter_config_base_is_checked_too(run_copy: Path) -> None:
    config_path = run_copy / "final" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = "gguf:ffffffffffffffff"
    config_path.write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="gguf:ffffffffffffffff"):
        load_session(resolve_source(run=run_copy))


def test_an_adapter_whose_tensors_do_not_fit_is_refused(run_copy: Path) -> None:
    def widen(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: torch.zeros(v.shape[0], v.shape[1] * 2) if "lora_A" in k else v
                for k, v in state.items()}  # fmt: skip

    _rewrite_weights(run_copy / "final", widen)
    with pytest.raises(ConfigError, match=r"does not fit the base model: .*has 32 inputs"):
        load_session(resolve_source(run=run_copy))


def test_an_adapter_for_layers_the_base_lacks_is_refused(run_copy: Path) -> None:
    def rename(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k.replace("layers.1.", "layers.7."): v for k, v in state.items()}

    _rewrite_weights(run_copy / "final", rename)
    with pytest.raises(ConfigError, match=r"adapts layer model\.layers\.7\..*lacks"):
        load_session(resolve_source(run=run_copy))


# --- answers ----------------------------------------------------------------------------------


def _reference_ids(model: Any, tokenizer: Any, prompt: str) -> list[int]:
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    output = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=6,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    return [int(t) for t in output[0, ids.shape[1] :]]


def test_base_pane_is_the_plain_base_and_tuned_pane_is_base_plus_adapter(
    session: ServeSession, tiny_run: Path, tiny_model_dir: Path
) -> None:
    """One resident model: with the adapter off it must answer exactly as the base model does.

    (The tiny model's greedy answers are whitespace, so token ids are compared, not text.)
    """
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    prompt = session.prompt("Question 2 about open_qa?")
    assert prompt.startswith("<|im_start|>user\nQuestion 2 about open_qa?")  # the chat template
    expected_base = _reference_ids(base, tokenizer, prompt)
    tuned = PeftModel.from_pretrained(base, tiny_run / "final")
    expected_tuned = _reference_ids(tuned, tokenizer, prompt)
    assert expected_base != expected_tuned  # the adapter changes the answer
    assert session.answer_ids(prompt, GREEDY, adapter=False).tolist() == expected_base
    assert session.answer_ids(prompt, GREEDY, adapter=True).tolist() == expected_tuned
    # and the model is left as it was: adapter on
    assert session.answer_ids(prompt, GREEDY, adapter=True).tolist() == expected_tuned


def test_streaming_grows_to_the_whole_answer(session: ServeSession) -> None:
    settings = GenerationSettings(temperature=1.0, top_k=0, top_p=1.0, num_beams=1,
                                  max_new_tokens=12, seed=5)  # fmt: skip
    whole = session.generate("Name a bird.", "", settings)
    pieces = list(session.stream("Name a bird.", "", settings))
    assert pieces and pieces[-1] == whole
    assert all(b.startswith(a) for a, b in itertools.pairwise(pieces[:-1]))


def test_beams_answer_once_and_seeds_repeat(session: ServeSession) -> None:
    beams = GenerationSettings(temperature=0.7, num_beams=2, max_new_tokens=5, seed=1)
    assert len(list(session.stream("Hi", "", beams))) == 1
    sampled = GenerationSettings(temperature=1.0, num_beams=1, max_new_tokens=8, seed=9)
    assert session.generate("Hi", "", sampled) == session.generate("Hi", "", sampled)


def test_an_abandoned_stream_stops_generating_and_frees_the_model(session: ServeSession) -> None:
    settings = GenerationSettings(temperature=1.0, num_beams=1, max_new_tokens=400, seed=2)
    stream = session.stream("Write a long story.", "", settings)
    next(stream)
    stream.close()  # the reader went away: the worker stops, the lock is released
    assert session.generate("Hi", "", GREEDY) is not None


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("temperature", -0.1, "temperature"),
        ("top_p", 0.0, "top-p"),
        ("top_k", -1, "top-k"),
        ("num_beams", 0, "beams"),
        ("max_new_tokens", 0, "max new tokens"),
    ],
)
def test_out_of_range_settings_are_refused(field: str, value: float, message: str) -> None:
    settings = GenerationSettings(**{field: value})  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=message):
        settings.check()


def test_shepherd_defaults_and_sampling_switch() -> None:
    d = GenerationSettings()
    assert (d.temperature, d.top_p, d.top_k, d.num_beams, d.max_new_tokens) == (
        0.1, 0.75, 40, 4, 128)  # fmt: skip
    assert not d.streams and d.generate_kwargs()["do_sample"] is True
    assert GenerationSettings(temperature=0).generate_kwargs() == {
        "num_beams": 4, "max_new_tokens": 128, "do_sample": False}  # fmt: skip


def test_alpaca_template_from_the_run_or_the_flag(tiny_run: Path) -> None:
    session = ServeSession(None, None, resolve_source(run=tiny_run, template="alpaca"), "x")
    assert "### Instruction:\nSay hi\n\n### Input:\nto Bob" in session.prompt("Say hi", "to Bob")


# --- the command ------------------------------------------------------------------------------


def test_generate_command_prints_both_answers(tiny_run: Path) -> None:
    args = ["generate", "--run", str(tiny_run), "--both", "--temperature", "1", "--beams", "1",
            "--max-new-tokens", "4", "--seed", "0", "Name a colour."]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "--- base model ---" in result.output and "--- fine-tuned (round 2) ---" in result.output
    refused = CliRunner().invoke(app, ["generate", "--run", str(tiny_run), "--round", "9", "x"])
    assert isinstance(refused.exception, ConfigError)


def test_the_real_command_reports_a_missing_run_with_exit_code_2(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "covey.serve.commands", "generate", "--run", str(tmp_path / "nope"),
         "hello"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert "error:" in result.stderr and "no such folder" in result.stderr
