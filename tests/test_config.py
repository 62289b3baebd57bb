"""Recipes: TOML + overrides into typed dataclasses, errors that name the key, shipped recipes."""

from __future__ import annotations

import dataclasses
import re
import sys
import typing
from pathlib import Path

import pytest

from covey.config import RunConfig, StrategyName, load_recipe, to_toml
from covey.errors import ConfigError
from covey.fed.strategies import STRATEGIES

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

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


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["fed.strategy=fedavgg"], "--set fed.strategy=fedavgg: fed.strategy = 'fedavgg' is not "
         "one of: fedavg, fedprox, fedavgm, fedadam, fedyogi, fedadagrad, median, trimmed_mean, "
         "krum, multi_krum, norm_clip (did you mean 'fedavg'?)"),
        (["fed.trim_fraction=0.5"], "--set fed.trim_fraction=0.5: fed.trim_fraction must be in "
         "[0, 0.5) (a share dropped at each end), got 0.5"),
        (["fed.krum_byzantine=-1"], "fed.krum_byzantine must be >= 0, got -1"),
        (["fed.clip_norm=-1"], "fed.clip_norm must be >= 0, got -1.0"),
        (["fed.consensus=flock", "fed.strategy=fedadam"], "fed.strategy = 'fedadam' cannot "
         "combine with fed.consensus = 'flock' (it keeps server state, which FLock's participants "
         "do not share); use one of fedavg, median, trimmed_mean, krum, multi_krum, norm_clip"),
        (["attack.poison_fraction=0"], "attack.poison_fraction must be in (0, 1], got 0.0"),
        (["attack.trigger=' '"], "attack.trigger is empty: give a phrase"),
        (["attack.estimate_shards=1"], "attack.estimate_shards must be >= 2"),
        (["train.lr_schedule=cosin"], "train.lr_schedule = 'cosin' is not one of: constant, "
         "linear, cosine (did you mean 'cosine'?)"),
        (["model.dtype=bf16"], "model.dtype = 'bf16' is not one of: auto, float32"),
        (["model.device=gpu"], "model.device = 'gpu' is not one of: auto, cpu, cuda, cuda:N"),
        (["train.lr=0"], "--set train.lr=0: train.lr must be > 0, got 0.0"),
        (["train.batch_size=2"], "train.batch_size (2) must be >= train.micro_batch_size (8)"),
        (["fed.client_fraction=1.5"], "fed.client_fraction must be in (0, 1], got 1.5"),
        (["fed.server_momentum=1"], "fed.server_momentum must be in [0, 1), got 1.0"),
        (["flock.threshold_pct=0"], "flock.threshold_pct must be in 1..99, got 0"),
        (
            ["fed.consensus=flock", "train.max_steps=2", "flock.keeper_fee=8", "fed.rounds=3"],
            "flock.keeper_fee = 8 x 7 transitions",
        ),
        (["lora.dropout=1.0"], "lora.dropout must be in [0, 1), got 1.0"),
        (["eval.batch_size=0"], "eval.batch_size must be >= 1, got 0"),
        (["run.out=''"], "run.out is empty"),
        (["fed.consensus=flock", "fed.client_fraction=0.5"], "fed.client_fraction = 0.5 cannot "
         "combine with fed.consensus = 'flock'"),
        (["fed.strategy=fedprox"], "train.prox_mu must be > 0 with fed.strategy = 'fedprox'"),
        (["attack.kind=random_vote"], "attack.kind = 'random_vote' is a FLock voters' attack"),
        (["attack.malicious_fraction=0.3"], "attack.malicious_fraction = 0.3 needs an attack.kind"),
        (["train.lrr=1"], "--set train.lrr=1: unknown setting train.lrr (did you mean 'lr'?)"),
    ],
)  # fmt: skip
def test_every_setting_is_checked_when_the_recipe_is_read(
    overrides: list[str], expected: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_recipe(None, overrides)
    assert expected in str(caught.value)


def test_errors_name_the_recipe_file_when_it_holds_the_bad_value(tmp_path: Path) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text('[train]\nlr_schedule = "cosin"\n')
    with pytest.raises(ConfigError, match=r"^.*r\.toml: train\.lr_schedule = 'cosin'"):
        load_recipe(recipe, ["train.lr=1e-3"])


def test_settings_built_in_code_are_checked_too() -> None:
    with pytest.raises(ConfigError, match="template = 'chatml' is not one of: alpaca, chat"):
        dataclasses.replace(RunConfig().prompt, template="chatml")  # type: ignore[arg-type]


def test_strategy_choices_are_the_implemented_strategies() -> None:
    assert typing.get_args(StrategyName) == tuple(STRATEGIES)


@pytest.mark.parametrize("recipe", sorted((ROOT / "examples").glob("*.toml")), ids=lambda p: p.name)
@pytest.mark.parametrize(
    ("key", "bad"), [("strategy", "fedavgg"), ("lr_schedule", "cosin"), ("template", "chatt")]
)
def test_a_misspelt_choice_in_a_shipped_recipe_fails(
    recipe: Path, key: str, bad: str, tmp_path: Path
) -> None:
    """The shipped-recipe check would catch a typo: each recipe, with one value misspelt."""
    section = {"strategy": "fed", "lr_schedule": "train", "template": "prompt"}[key]
    text, replaced = re.subn(rf"(?m)^{key}\s*=.*$", f"{key} = {bad!r}", recipe.read_text())
    if not replaced:
        table = f"[{section}]\n"
        text = text.replace(table, f"{table}{key} = {bad!r}\n") if table in text else (
            text + f"\n{table}{key} = {bad!r}\n"
        )  # fmt: skip
    assert tomllib.loads(text)[section][key] == bad
    broken = tmp_path / recipe.name
    broken.write_text(text)
    with pytest.raises(ConfigError, match=f"{key} = '{bad}' is not one of"):
        load_recipe(broken)


def test_split_writes_where_train_reads_by_default() -> None:
    """`covey data split && covey train RECIPE` chain without flags."""
    from covey.data.split import SplitConfig

    assert str(SplitConfig().out) == RunConfig().data.dir
