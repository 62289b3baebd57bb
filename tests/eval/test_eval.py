"""`covey eval` on the tiny model: the real CLI end to end, and the errors a user can fix."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from rouge_score import rouge_scorer

from covey.errors import ConfigError, DataError
from covey.eval.run import EvalOptions, choose_sources, run_eval
from tests.conftest import write_records


def covey(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "covey", *args], capture_output=True, text=True, timeout=300
    )


def test_eval_of_a_run_writes_the_comparison_and_prints_the_table(tiny_run: Path) -> None:
    run = tiny_run
    out = run.parent / "eval-cli"
    done = covey("eval", "--run", str(run), "--round", "1", "--round", "2", "--out", str(out),
                 "--max-new-tokens", "8", "--batch-size", "4", "--show", "2")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "ROUGE-L F1" in done.stdout and "round 2" in done.stdout
    assert "sample answers (greedy preset" in done.stdout  # the serving defaults, named

    summary = json.loads((out / "eval.json").read_text())
    assert [m["name"] for m in summary["models"]] == ["base", "round 1", "round 2"]
    assert summary["generation"]["settings"]["repetition_penalty"] == 1.0  # plain greedy
    assert summary["generation"]["settings"]["max_new_tokens"] == 8
    lines = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    assert len(lines) == summary["test"]["records"] == 16  # client_data_dir holds 16 test records
    assert set(lines[0]) >= {"instruction", "reference", "answers", "category"}
    assert (out / "comparison.png").read_bytes()[:4] == b"\x89PNG"
    assert len(summary["samples"]["answers"]) == 2

    # ROUGE-L agrees with rouge-score computed independently on the same answers
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    for m in summary["models"]:
        mine = [scorer.score(a["reference"], a["answers"][m["name"]])["rougeL"].fmeasure
                for a in lines]  # fmt: skip
        assert m["rouge_l"] == pytest.approx(sum(mine) / len(mine), abs=1e-12)
        categories = m["by_category"]
        assert sum(c["answers"] for c in categories.values()) == len(lines)
    tuned = summary["models"][2]
    assert tuned["loss"] < summary["models"][0]["loss"]  # the fixture's run learnt its data
    assert tuned["rouge_l_vs_base"]["mean"] == pytest.approx(
        tuned["rouge_l"] - summary["models"][0]["rouge_l"]
    )

    again = covey("eval", "--run", str(run), "--out", str(out))
    assert again.returncode == 2 and "pass --overwrite" in again.stderr


def test_the_same_answers_batched_or_one_at_a_time(tiny_run: Path, tmp_path: Path) -> None:
    """Greedy answers do not depend on the batch (left padding keeps every prompt intact)."""
    sources = choose_sources(tiny_run, [], [])
    options = {"limit": 6, "show": 0, "settings": _short()}
    one = run_eval(sources, EvalOptions(out=tmp_path / "one", batch_size=1, **options))
    six = run_eval(sources, EvalOptions(out=tmp_path / "six", batch_size=6, **options))
    assert [a["answers"] for a in one.answers] == [a["answers"] for a in six.answers]
    assert one.summary["models"][1]["loss"] == pytest.approx(six.summary["models"][1]["loss"])


def test_a_bare_peft_folder_is_evaluated_with_base(
    tiny_run: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """A PEFT folder alone (as `covey flock fetch` writes one) beside a run's round."""
    bare = tmp_path / "fetched"
    bare.mkdir()
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        shutil.copy(tiny_run / "final" / name, bare / name)
    sources = choose_sources(tiny_run, [1], [bare], template="chat")
    result = run_eval(
        sources,
        EvalOptions(out=tmp_path / "out", limit=4, show=0, settings=_short()),
    )
    names = [m["name"] for m in result.summary["models"]]
    assert names == ["base", "round 1", "fetched"]
    final = choose_sources(tiny_run, [], [])
    same = run_eval(final, EvalOptions(out=tmp_path / "final", limit=4, show=0, settings=_short()))
    assert result.summary["models"][2]["loss"] == pytest.approx(same.summary["models"][1]["loss"])


def _short():  # type: ignore[no-untyped-def]
    from covey.eval.run import decoding_settings

    return decoding_settings(None, None, 6)


# --- errors --------------------------------------------------------------------------------


def test_a_bad_adapter_path_is_refused(tiny_run: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no adapter_model\\.safetensors"):
        choose_sources(None, [], [tmp_path / "nowhere"])
    with pytest.raises(ConfigError, match="no such folder"):
        choose_sources(tmp_path / "no-run", [], [])
    with pytest.raises(ConfigError, match="no such round"):
        choose_sources(tiny_run, [9], [])
    done = covey("eval", "--adapter", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o"))
    assert done.returncode == 2 and "no adapter_model.safetensors" in done.stderr


def test_an_adapter_for_another_base_is_refused_before_loading(
    tiny_run: Path, tmp_path: Path
) -> None:
    from tests.model.tiny import make_tiny_model_dir

    other = make_tiny_model_dir(tmp_path / "other", pad_token=False)  # another config.json
    other_run = tmp_path / "other-run"
    shutil.copytree(tiny_run, other_run)
    config = (other_run / "config.toml").read_text()
    base = json.loads(config.split("base = ", 1)[1].split("\n", 1)[0])
    (other_run / "config.toml").write_text(config.replace(json.dumps(base), json.dumps(str(other))))
    # the run's final adapter on its own base, and an adapter of the same base on the other
    sources = choose_sources(other_run, [], [tiny_run / "final"])
    with pytest.raises(ConfigError, match="trained on base model"):
        run_eval(sources, EvalOptions(out=tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_a_test_file_without_references_is_refused(tiny_run: Path, tmp_path: Path) -> None:
    bare = write_records(tmp_path / "questions.jsonl", [{"instruction": "Why?", "category": "x"}])
    sources = choose_sources(tiny_run, [], [])
    with pytest.raises(DataError, match="no record has a reference answer"):
        run_eval(sources, EvalOptions(out=tmp_path / "out", test=bare))
    partial = write_records(
        tmp_path / "partial.jsonl",
        [{"instruction": "Why?", "response": "Because."}, {"instruction": "How?", "response": ""}],
    )
    with pytest.raises(DataError, match="line 2: field 'response' is empty"):
        run_eval(sources, EvalOptions(out=tmp_path / "out", test=partial))
    with pytest.raises(ConfigError, match=r"--test .*: no such file"):
        run_eval(sources, EvalOptions(out=tmp_path / "out", test=tmp_path / "none.jsonl"))
    bare_adapter = shutil.copytree(tiny_run / "final", tmp_path / "adapter")
    with pytest.raises(ConfigError, match="name the held-out file"):
        run_eval(choose_sources(None, [], [bare_adapter]), EvalOptions(out=tmp_path / "o"))
