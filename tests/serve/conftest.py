"""A tiny finished run, trained once per test session by the real engine, for the serve tests."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from covey.config import RunConfig, load_recipe
from covey.serve.generate import ServeSession


def tiny_recipe(tiny_model_dir: Path, client_data_dir: Path, out: Path, *sets: str) -> RunConfig:
    """The engine tests' tiny recipe (tests/fed/test_engine.py), cut to 2 rounds."""
    return load_recipe(
        None,
        [
            f"model.base='{tiny_model_dir}'",
            f"data.dir='{client_data_dir}'",
            f"run.out='{out}'",
            "lora.r=4",
            "lora.alpha=8",
            "lora.dropout=0.0",
            "prompt.template=chat",
            "prompt.cutoff_len=128",
            "train.epochs=2",
            "train.batch_size=8",
            "train.micro_batch_size=8",
            "train.lr=3e-2",
            "fed.rounds=2",
            "eval.sample_instructions=1",
            "eval.max_new_tokens=4",
            *sets,
        ],
    )


@pytest.fixture(scope="session")
def tiny_run(
    tiny_model_dir: Path, client_data_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """A complete 2-round run folder: config.toml, round_000..002, final/, metrics, loss.png."""
    from covey.fed import engine
    from covey.model.loading import base_model_id, load_base_model

    out = tmp_path_factory.mktemp("serve-run") / "run"
    cfg = tiny_recipe(tiny_model_dir, client_data_dir, out)
    model, tokenizer = load_base_model(cfg.model)
    fed = engine.prepare(cfg, model, tokenizer, base_model_id(cfg.model))
    engine.run_federated(cfg, fed)
    return out


@pytest.fixture(scope="session")
def session(tiny_run: Path) -> ServeSession:
    """The run's final adapter on its base, loaded once (tests must not change it)."""
    from covey.serve.adapters import resolve_source
    from covey.serve.generate import load_session

    return load_session(resolve_source(run=tiny_run))


@pytest.fixture
def run_copy(tiny_run: Path, tmp_path: Path) -> Path:
    """A private copy of the run, for tests that damage or edit it."""
    return Path(shutil.copytree(tiny_run, tmp_path / "run"))
