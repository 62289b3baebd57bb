"""Answers with the adapter on, off and both at once; decoding presets; the generate command."""

from __future__ import annotations

import itertools
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from covey.cli import app
from covey.errors import ConfigError
from covey.model.generate import PRESETS, GenerationSettings, preset_settings
from covey.serve.adapters import resolve_source
from covey.serve.generate import BASE, TUNED, ServeSession

GREEDY = GenerationSettings(max_new_tokens=6)
SAMPLED = GenerationSettings(sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=12)


def _reference(
    tiny_model_dir: Path, tiny_run: Path, prompt: str, settings: GenerationSettings
) -> tuple[list[int], list[int]]:
    """(base answer, base + adapter answer) by plain transformers and PEFT, up to the first EOS."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]

    def answer(model: Any) -> list[int]:
        output = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            pad_token_id=tokenizer.pad_token_id,
            **settings.generate_kwargs(),
        )
        tokens = [int(t) for t in output[0, ids.shape[1] :]]
        eos = tokenizer.eos_token_id
        return tokens[: tokens.index(eos)] if eos in tokens else tokens

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    plain = answer(base)
    return plain, answer(PeftModel.from_pretrained(base, tiny_run / "final"))


@pytest.mark.parametrize("preset", ["greedy", "shepherd"])
def test_each_pane_is_what_plain_transformers_and_peft_answer(
    session: ServeSession, tiny_run: Path, tiny_model_dir: Path, preset: str
) -> None:
    """One resident model: with the adapter off it answers exactly as the base model does, and
    the two panes batched together answer as each alone. The shepherd preset is Shepherd's
    deterministic beam search. (The tiny model's answers are mostly whitespace, so token ids
    are compared, not text.)"""
    settings = preset_settings(preset, max_new_tokens=6)
    prompt = session.prompt("Question 2 about open_qa?")
    assert prompt.startswith("<|im_start|>user\nQuestion 2 about open_qa?")  # the chat template
    expected_base, expected_tuned = _reference(tiny_model_dir, tiny_run, prompt, settings)
    assert expected_base != expected_tuned  # the adapter changes the answer
    assert session.answer_ids(prompt, settings, (BASE,)) == [expected_base]
    assert session.answer_ids(prompt, settings, (TUNED,)) == [expected_tuned]
    assert session.answer_ids(prompt, settings, (BASE, TUNED)) == [expected_base, expected_tuned]
    assert session.answer_ids(prompt, settings) == [expected_tuned]  # the adapter is left on


def test_both_panes_stream_together_to_the_single_answers(session: ServeSession) -> None:
    pieces = list(session.stream("Name a bird.", "", GREEDY, (BASE, TUNED)))
    assert len(pieces) > 1 and all(len(p) == 2 for p in pieces)  # streamed, two panes each
    assert pieces[-1] == (
        session.generate("Name a bird.", "", GREEDY, adapter=BASE),
        session.generate("Name a bird.", "", GREEDY, adapter=TUNED),
    )


def test_streaming_grows_to_the_whole_answer(session: ServeSession) -> None:
    settings = replace(SAMPLED, seed=5)
    whole = session.generate("Name a bird.", "", settings)
    pieces = [p[0] for p in session.stream("Name a bird.", "", settings)]
    assert len(pieces) > 1 and pieces[-1] == whole
    assert all(b.startswith(a) for a, b in itertools.pairwise(pieces[:-1]))


def test_the_defaults_are_deterministic_and_stream() -> None:
    """Shepherd's values with sampling on drew a new answer every call and could not stream."""
    default = GenerationSettings()
    assert default.preset() == "greedy" and default.streams
    assert default.generate_kwargs()["do_sample"] is False
    assert default.describe().startswith("greedy preset: greedy decoding (deterministic)")


def test_default_answers_repeat_without_a_seed(session: ServeSession) -> None:
    first = session.answer_ids(session.prompt("Name a bird."), GREEDY)
    assert session.answer_ids(session.prompt("Name a bird."), GREEDY) == first


def test_the_shepherd_preset_is_shepherds_beam_search() -> None:
    shepherd = PRESETS["shepherd"]
    assert (shepherd.temperature, shepherd.top_p, shepherd.top_k, shepherd.num_beams) == (
        0.1, 0.75, 40, 4)  # fmt: skip
    assert shepherd.max_new_tokens == 128 and not shepherd.streams
    kwargs = {"do_sample": False, "num_beams": 4, "repetition_penalty": 1.0, "max_new_tokens": 128}
    assert shepherd.generate_kwargs() == kwargs  # no sampling values: transformers ignores them
    assert shepherd.describe().startswith("shepherd preset: 4-beam search (deterministic)")


def test_changed_settings_are_custom_but_length_and_seed_keep_the_preset() -> None:
    assert preset_settings("greedy", max_new_tokens=32, seed=3).preset() == "greedy"
    assert preset_settings("shepherd", max_new_tokens=32).preset() == "shepherd"
    custom = preset_settings("greedy", num_beams=2)
    assert custom.preset() is None and custom.describe().startswith("custom settings: 2-beam")
    sampled = preset_settings("greedy", sample=True, seed=7)
    assert sampled.describe().startswith("custom settings: sampling at temperature 0.7")
    with pytest.raises(ConfigError, match="--preset 'fast' is unknown; choose one of greedy"):
        preset_settings("fast")


def test_beams_answer_once_and_seeds_repeat(session: ServeSession) -> None:
    beams = GenerationSettings(num_beams=2, max_new_tokens=5)
    assert len(list(session.stream("Hi", "", beams, (BASE, TUNED)))) == 1
    sampled = replace(SAMPLED, seed=9)
    answer = session.generate("Hi", "", sampled)
    assert answer and session.generate("Hi", "", sampled) == answer
    assert session.generate("Hi", "", replace(sampled, seed=10)) != answer  # it does sample


def test_an_abandoned_stream_stops_generating_and_frees_the_model(
    session: ServeSession, tiny_run: Path, tiny_model_dir: Path
) -> None:
    """Closing a stream early stops `generate` within a token or two (not after all 400), and
    the next answer is the model's own: the lock is free, the adapter on, no stop left set."""
    steps = 0

    def count(*_: Any) -> None:
        nonlocal steps
        steps += 1

    settings = replace(SAMPLED, max_new_tokens=400, seed=2)
    hook = session.model.get_base_model().register_forward_hook(count)
    try:
        stream = session.stream("Write a long story.", "", settings, (BASE, TUNED))
        next(stream)
        stream.close()  # the reader went away: the worker stops, the lock is released
    finally:
        hook.remove()
    assert not [t for t in threading.enumerate() if t.name == "covey-generate"]
    assert steps <= 4, f"generate ran {steps} forward passes after the reader left"
    question = "Question 2 about open_qa?"  # the adapter changes its greedy answer
    prompt = session.prompt(question)
    expected_base, expected_tuned = _reference(tiny_model_dir, tiny_run, prompt, GREEDY)
    assert expected_base != expected_tuned
    assert session.answer_ids(prompt, GREEDY) == [expected_tuned]
    text = session.tokenizer.decode(expected_tuned, skip_special_tokens=True)
    assert session.generate(question, "", GREEDY) == text.strip()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"sample": True, "temperature": 0.0}, "temperature must be > 0 when sampling"),
        ({"top_p": 0.0}, "top-p"),
        ({"top_k": -1}, "top-k"),
        ({"num_beams": 0}, "beams"),
        ({"repetition_penalty": 0.0}, "repetition penalty"),
        ({"max_new_tokens": 0}, "max new tokens"),
    ],
)
def test_out_of_range_settings_are_refused(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        GenerationSettings(**changes).check()


def test_alpaca_template_from_the_run_or_the_flag(tiny_run: Path) -> None:
    session = ServeSession(None, None, resolve_source(run=tiny_run, template="alpaca"), "x")
    assert "### Instruction:\nSay hi\n\n### Input:\nto Bob" in session.prompt("Say hi", "to Bob")


# --- the command ------------------------------------------------------------------------------


def test_generate_command_prints_both_answers_and_the_preset(tiny_run: Path) -> None:
    args = ["generate", "--run", str(tiny_run), "--both", "--max-new-tokens", "4", "Name a colour."]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "--- base model ---" in result.output and "--- fine-tuned (round 2) ---" in result.output
    assert "generation: greedy preset: greedy decoding (deterministic)" in result.output
    shepherd = CliRunner().invoke(app, [*args[:-1], "--preset", "shepherd", "Name a colour."])
    assert shepherd.exit_code == 0, shepherd.output
    assert "generation: shepherd preset: 4-beam search" in shepherd.output
    refused = CliRunner().invoke(app, ["generate", "--run", str(tiny_run), "--round", "9", "x"])
    assert isinstance(refused.exception, ConfigError)


def test_generate_command_decodes_on_the_threads_asked_and_gives_them_back(
    tiny_run: Path,
) -> None:
    before = torch.get_num_threads()
    args = ["generate", "--run", str(tiny_run), "--max-new-tokens", "2", "Name a colour."]
    result = CliRunner().invoke(app, [*args[:-1], "--threads", "1", args[-1]])
    assert result.exit_code == 0, result.output
    assert "; 1 CPU thread\n" in result.output
    assert torch.get_num_threads() == before
    negative = CliRunner().invoke(app, [*args[:-1], "--threads", "-1", args[-1]])
    assert negative.exit_code == 2 and "--threads" in negative.output


def test_the_real_command_reports_a_missing_run_with_exit_code_2(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "covey", "generate", "--run", str(tmp_path / "nope"), "hello"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert "error:" in result.stderr and "no such folder" in result.stderr


def test_the_real_command_writes_plain_text_to_a_log(tiny_run: Path) -> None:
    """Off a terminal: no ANSI codes, no progress bars, no library warnings; the answers on
    stdout, what was loaded and which preset answered on stderr."""
    result = subprocess.run(
        [sys.executable, "-m", "covey", "generate", "--run", str(tiny_run), "--both",
         "--max-new-tokens", "4", "Name a colour."],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("--- base model ---\n")
    assert "generation: greedy preset" in result.stderr
    output = result.stdout + result.stderr
    for noise in ("\x1b[", "Loading weights", "Warning", "%|"):
        assert noise not in output, f"{noise!r} in the output:\n{output}"
