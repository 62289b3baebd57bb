"""Recipes: TOML + overrides into typed dataclasses, errors that name the key, shipped recipes."""

from __future__ import annotations

from pathlib import Path

import pytest

from covey.config import RunConfig, load_recipe, to_toml
from covey.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_and_overrides() -> None:
    cfg = load_recipe(None, ["train.lr=1e-4", "fed.rounds=7", "lora.target_modules=['q_proj']"])
    assert cfg.train.lr == 1e-4 and cfg.fed.rounds == 7 and cfg.lora.target_modules == ["q_proj"]
    assert cfg.model == RunConfig().model
    cfg = load_recipe(None, ["prompt.template=chat", "train.epochs=2"])  # bare word, int -> float
    assert cfg.prompt.template == "chat" and cfg.train.epochs == 2.0


def test_recipe_file_and_round_trip(tmp_path: Path) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text('[fed]\nstrategy = "fedadam"\nserver_lr = 0.01\n[run]\nseed = 3\n')
    cfg = load_recipe(recipe, ["run.seed=4"])
    assert (cfg.fed.strategy, cfg.fed.server_lr, cfg.run.seed) == ("fedadam", 0.01, 4)
    (tmp_path / "back.toml").write_text(to_toml(cfg))
    assert load_recipe(tmp_path / "back.toml") == cfg


@pytest.mark.parametrize(
    ("text", "overrides", "expected"),
    [
        ("[train]\nlearning_rate = 1\n", [], "unknown setting train.learning_rate"),
        ("[trian]\nlr = 1\n", [], "unknown setting trian"),
        ('[train]\nlr = "fast"\n', [], "train.lr must be float"),
        ("[fed]\nrounds = 2.5\n", [], "fed.rounds must be int"),
        ("[prompt]\ntrain_on_inputs = 1\n", [], "prompt.train_on_inputs must be bool"),
        ("[lora]\ntarget_modules = 'q_proj'\n", [], "lora.target_modules must be a list"),
        ("[train\n", [], "invalid TOML"),
        ("", ["train.lr"], "expected section.key=value"),
    ],
)
def test_bad_recipes_name_the_key(
    tmp_path: Path, text: str, overrides: list[str], expected: str
) -> None:
    recipe = tmp_path / "bad.toml"
    recipe.write_text(text)
    with pytest.raises(ConfigError, match=expected.replace(".", r"\.")):
        load_recipe(recipe, overrides)


def test_missing_recipe() -> None:
    with pytest.raises(ConfigError, match="recipe not found"):
        load_recipe("nope.toml")


@pytest.mark.parametrize("recipe", sorted((ROOT / "examples").glob("*.toml")), ids=lambda p: p.name)
def test_every_shipped_recipe_loads(recipe: Path) -> None:
    cfg = load_recipe(recipe)
    assert cfg.fed.rounds >= 1
    assert cfg.fingerprint() == load_recipe(recipe).fingerprint()
