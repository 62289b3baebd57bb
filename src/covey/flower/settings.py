"""The Flower run config: each key's name, default and meaning, defined once.

The ServerApp reads the run config with `FlowerSettings.from_run_config`; `covey flower run`,
`local` and `simulate` write it with `run_config` and take their option defaults and help from
the same fields (`default`, `help`). Flower needs the defaults as literals in the app's
pyproject.toml (`[tool.flwr.app.config]`); a test checks that they equal these.

Imports neither Flower nor torch, so the `covey` CLI can build its options from it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from covey.errors import ConfigError

RunConfigValue = bool | int | float | str
"""A value of Flower's run config."""


def _key(name: str, help: str) -> dict[str, str]:
    return {"key": name, "help": help}


@dataclass
class FlowerSettings:
    """Covey's settings for one run on Flower; checked when built."""

    recipe: str = field(
        default="",
        metadata=_key("recipe", 'Covey TOML recipe on the ServerApp\'s machine ("": defaults).'),
    )
    overrides: list[str] = field(
        default_factory=list,
        metadata=_key("set", "Recipe overrides section.key=value, ';'-separated."),
    )
    wire_dtype: str = field(
        default="float32",
        metadata=_key(
            "wire-dtype",
            "Global adapter dtype on the way to clients: float32 (exact), float16, bfloat16 "
            "(updates come back as the recipe's fed.transport).",
        ),
    )
    min_nodes: int = field(
        default=2, metadata=_key("min-nodes", "Clients that must be connected before each round.")
    )
    node_wait: float = field(
        default=300.0, metadata=_key("node-wait", "Seconds to wait for min-nodes clients.")
    )
    round_timeout: float = field(
        default=3600.0,
        metadata=_key("round-timeout", "Seconds a round waits for replies; then silent ones drop."),
    )
    resume: bool = field(
        default=False, metadata=_key("resume", "Continue run.out from its last complete round.")
    )

    def __post_init__(self) -> None:
        self.node_wait, self.round_timeout = float(self.node_wait), float(self.round_timeout)
        if self.min_nodes < 1:
            raise ConfigError(f"min-nodes must be >= 1, got {self.min_nodes}")
        if self.node_wait <= 0 or self.round_timeout <= 0:
            raise ConfigError("node-wait and round-timeout must be > 0 seconds")
        for item in self.overrides:
            if ";" in item:
                raise ConfigError(f"--set {item!r}: values may not contain ';' on Flower")
        from covey.flower.codec import wire_dtype

        wire_dtype(self.wire_dtype)

    @classmethod
    def from_run_config(cls, run_config: dict[str, Any]) -> FlowerSettings:
        """Read and check a run config; unknown keys are errors that name the key."""
        fields = {f.metadata["key"]: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(run_config) - set(fields))
        if unknown:
            raise ConfigError(
                f"run config: unknown key {unknown[0]!r}; known: {', '.join(sorted(fields))}"
            )
        values: dict[str, Any] = {}
        for key, value in run_config.items():
            name = fields[key].name
            if name == "overrides":
                text = _typed(key, value, str)
                values[name] = [p.strip() for p in text.replace("\n", ";").split(";") if p.strip()]
            else:
                values[name] = _typed(key, value, type(default(name)))
        try:
            return cls(**values)
        except ConfigError as e:
            raise ConfigError(f"run config: {e}") from None

    def run_config(self) -> dict[str, RunConfigValue]:
        """The run config holding these settings (every key, as in the app's pyproject.toml)."""
        config: dict[str, RunConfigValue] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            config[f.metadata["key"]] = "; ".join(value) if f.name == "overrides" else value
        return config


def default(name: str) -> Any:
    """The default of the FlowerSettings field `name` (for CLI options)."""
    found = {f.name: f for f in dataclasses.fields(FlowerSettings)}[name]
    if found.default_factory is not dataclasses.MISSING:
        return found.default_factory()
    return found.default


def help_text(name: str) -> str:
    """The help of the FlowerSettings field `name` (for CLI options)."""
    return str({f.name: f for f in dataclasses.fields(FlowerSettings)}[name].metadata["help"])


def _typed(key: str, value: object, kind: type) -> Any:
    """`value` if it has the type of the key's default; a float key also takes an integer."""
    kinds: tuple[type, ...] = (int, float) if kind is float else (kind,)
    if (isinstance(value, bool) and kind is not bool) or not isinstance(value, kinds):
        raise ConfigError(f"run config: {key} must be {kind.__name__}, got {value!r}")
    return value
