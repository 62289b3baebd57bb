"""Every round knows its quality: ROUGE-L in the round record, metrics.jsonl, the plot, the
run tab and TensorBoard."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from covey.config import load_recipe
from covey.errors import ConfigError
from covey.fed import tracking
from tests.conftest import tiny_recipe


def test_rounds_score_a_fixed_subset_and_report_it_to_tensorboard(
    tiny_model_dir: Path, client_data_dir: Path, tmp_path: Path
) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from covey.fed import engine
    from covey.model.loading import base_model_id, load_base_model
    from covey.serve.app import read_run_view

    out = tmp_path / "run"
    cfg = tiny_recipe(tiny_model_dir, client_data_dir, out, "fed.rounds=1",
                      "eval.rouge_examples=3", "eval.rouge_max_new_tokens=6",
                      "eval.sample_instructions=0",  # as the demo: no sample answers
                      "run.report_to=['tensorboard']")  # fmt: skip
    model, tokenizer = load_base_model(cfg.model)
    fed = engine.prepare(cfg, model, tokenizer, base_model_id(cfg.model))
    assert len(fed.run_model.held_out.scored) == 3
    assert len({r.category for r in fed.run_model.held_out.scored}) == 3  # spread over the set
    result = engine.run_federated(cfg, fed)

    assert all(record["answers"] == [] for record in result.records)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for record, line in zip(result.records, metrics, strict=True):
        assert 0 <= record["eval"]["rouge_l"] <= 1 and record["eval"]["rouge_examples"] == 3
        assert line["eval"]["rouge_l"] == record["eval"]["rouge_l"]

    events = EventAccumulator(str(out / tracking.TENSORBOARD_DIR))
    events.Reload()
    for key in ("eval/loss", "eval/rouge_l"):
        logged = [(e.step, e.value) for e in events.Scalars(key)]
        expected = [(m["round"], m["eval"][key.split("/")[1]]) for m in metrics]
        assert [s for s, _ in logged] == [s for s, _ in expected]
        assert [v for _, v in logged] == pytest.approx([v for _, v in expected], rel=1e-6)

    view = read_run_view(out, tmp_path)
    assert view.losses.headers[-2:] == ["ROUGE-L F1", "heavy repetition"]
    assert view.losses.rows[1][4] == round(metrics[1]["eval"]["rouge_l"], 4)


def test_report_to_is_checked_at_load_and_before_the_model_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ConfigError, match=r"run\.report_to .*'tensorbord' is not one of"):
        load_recipe(None, ["run.report_to=['tensorbord']"])
    with pytest.raises(ConfigError, match="names a tracker twice"):
        load_recipe(None, ["run.report_to=['wandb', 'wandb']"])
    with pytest.raises(ConfigError, match=r"eval\.rouge_examples must be >= 0"):
        load_recipe(None, ["eval.rouge_examples=-1"])

    from covey.fed.rounds import RunFolder

    cfg = load_recipe(None, [f"run.out='{tmp_path / 'run'}'", "run.report_to=['mlflow']"])
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match="mlflow is not installed; install it with `pip install"):
        RunFolder.check(cfg, resume=False)
