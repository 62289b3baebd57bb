"""The one config schema: typed dataclasses, read from TOML recipes with dotted overrides.

A recipe is a TOML file whose tables match the sections of `RunConfig` (`[model]`, `[lora]`,
`[prompt]`, `[train]`, `[fed]`, `[eval]`, `[data]`, `[run]`, `[attack]`, `[flock]`);
`--set train.lr=1e-4` overrides one field. Unknown keys and wrong types are errors that name the
key. Attribute docstrings are the reference for every setting. Every checkpoint carries the
resolved config (`config.toml`).

- `schema`: the dataclasses, one per section, each checking its own settings, and `RunConfig`,
  which checks the rules across sections;
- `load`: reading recipes (files, text, `--set` overrides) and writing them back as TOML;
- `checks`: the range and choice checks the dataclasses use, and `SettingError`.

Import from here (`from covey.config import RunConfig, load_recipe`): these names are the
package's public surface.
"""

from covey.config.checks import SettingError
from covey.config.load import config_differences, load_recipe, load_recipe_text, to_toml
from covey.config.schema import (
    DEFAULT_DATA_DIR,
    DEFAULT_RUN_OUT,
    FLOCK_STRATEGIES,
    AttackConfig,
    AttackKind,
    Consensus,
    DataConfig,
    Dtype,
    EvalConfig,
    FedConfig,
    FlockConfig,
    LoraSettings,
    LrSchedule,
    ModelConfig,
    PromptConfig,
    Quantization,
    RunConfig,
    RunSettings,
    StrategyName,
    Template,
    Tracker,
    TrainConfig,
    Transport,
    flatten,
)

__all__ = [
    "DEFAULT_DATA_DIR",
    "DEFAULT_RUN_OUT",
    "FLOCK_STRATEGIES",
    "AttackConfig",
    "AttackKind",
    "Consensus",
    "DataConfig",
    "Dtype",
    "EvalConfig",
    "FedConfig",
    "FlockConfig",
    "LoraSettings",
    "LrSchedule",
    "ModelConfig",
    "PromptConfig",
    "Quantization",
    "RunConfig",
    "RunSettings",
    "SettingError",
    "StrategyName",
    "Template",
    "Tracker",
    "TrainConfig",
    "Transport",
    "config_differences",
    "flatten",
    "load_recipe",
    "load_recipe_text",
    "to_toml",
]
