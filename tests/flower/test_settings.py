"""The Flower run config: one source for each key's default, parsing, and checks."""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

import click
import pytest
import typer

from covey.errors import ConfigError
from covey.flower.cli import flower_app
from covey.flower.control import APP_DIR
from covey.flower.settings import FlowerSettings, help_text

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def typed(config: dict[str, Any]) -> dict[str, tuple[type, Any]]:
    """Values with their types: 300 and 300.0 differ in Flower's run config."""
    return {key: (type(value), value) for key, value in config.items()}


def test_the_app_declares_the_settings_defaults() -> None:
    """Flower needs literal defaults in the app's pyproject.toml: they must be FlowerSettings'."""
    project = tomllib.loads((APP_DIR / "pyproject.toml").read_text())
    declared = project["tool"]["flwr"]["app"]["config"]
    assert typed(declared) == typed(FlowerSettings().run_config())
    assert project["tool"]["flwr"]["app"]["components"] == {
        "serverapp": "covey.flower.server_app:app",
        "clientapp": "covey.flower.client_app:app",
    }


def test_cli_options_take_the_settings_defaults_and_help() -> None:
    """Every `covey flower` option named after a setting has that setting's default and help
    (`--set` is a repeatable flag, one override each: its own help)."""
    defaults = FlowerSettings()
    names = {f.name for f in dataclasses.fields(FlowerSettings)} - {"overrides"}
    group = typer.main.get_command(flower_app)
    assert isinstance(group, click.Group)
    checked = 0
    for command in group.commands.values():
        for param in command.params:
            if param.name in names and isinstance(param, click.Option):
                assert param.default == getattr(defaults, param.name), (command.name, param.name)
                assert param.help == help_text(param.name)
                checked += 1
    assert checked >= 8  # run: 5, local: 2, simulate: 1


def test_run_config_round_trip_and_parsing() -> None:
    settings = FlowerSettings("r.toml", ["fed.rounds=2", "train.lr=1e-4"], "bf16", 3, 5, 7, True)
    assert FlowerSettings.from_run_config(settings.run_config()) == settings
    parsed = FlowerSettings.from_run_config(
        {"set": "fed.rounds=2; train.lr=1e-4\nrun.seed=1;", "wire-dtype": "bf16", "min-nodes": 3}
    )
    assert parsed.overrides == ["fed.rounds=2", "train.lr=1e-4", "run.seed=1"]
    assert parsed.min_nodes == 3 and parsed.wire_dtype == "bf16"
    assert FlowerSettings.from_run_config({"node-wait": 5}).node_wait == 5.0


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"rounds": 3}, "unknown key 'rounds'"),
        ({"min-nodes": "3"}, "min-nodes must be int"),
        ({"resume": 1}, "resume must be bool"),
        ({"node-wait": True}, "node-wait must be float"),
        ({"min-nodes": 0}, "run config: min-nodes must be >= 1"),
        ({"round-timeout": 0}, "must be > 0 seconds"),
        ({"wire-dtype": "int8"}, "wire-dtype 'int8'"),
    ],
)
def test_bad_run_config_names_the_key(config: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        FlowerSettings.from_run_config(config)


def test_settings_are_checked_when_built() -> None:
    """The CLI builds FlowerSettings before it starts any process: bad values fail there."""
    with pytest.raises(ConfigError, match="may not contain ';'"):
        FlowerSettings(overrides=["data.dir='a;b'"])
    with pytest.raises(ConfigError, match="wire-dtype 'fp8'"):
        FlowerSettings(wire_dtype="fp8")
