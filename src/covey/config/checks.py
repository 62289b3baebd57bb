"""The range and choice checks of recipe settings, and the error that names the setting.

Each section's dataclass (`covey.config.schema`) checks its own fields in `__post_init__` with
these helpers, so a config built by code is checked as a recipe is; `covey.config.load` turns a
`SettingError` into a ConfigError that names the recipe or `--set` flag.
"""

from __future__ import annotations

import difflib
import math
import typing
from typing import Any, Literal

from covey.errors import ConfigError


class SettingError(ConfigError):
    """A setting out of range, raised by a dataclass's `__post_init__` with the field's name.

    `load_recipe` turns it into a ConfigError that names the recipe (or `--set`) and the full
    key; code that builds configs directly (or `dataclasses.replace`s them) sees the field and
    the rule.
    """

    def __init__(self, name: str, message: str) -> None:
        super().__init__(f"{name} {message}")
        self.name = name
        self.message = message


def require(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise SettingError(name, message)


def check_choices(obj: Any) -> None:
    """Every `Literal` field holds one of its choices (also when set by code, not a recipe)."""
    for name, hint in typing.get_type_hints(type(obj)).items():
        if typing.get_origin(hint) is Literal:
            value, allowed = getattr(obj, name), typing.get_args(hint)
            require(
                value in allowed and not isinstance(value, bool),
                name,
                f"= {value!r} is not one of: {', '.join(map(str, allowed))}"
                f"{did_you_mean(str(value), map(str, allowed))}",
            )


def check_positive(obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        require(math.isfinite(value) and value > 0, name, f"must be > 0, got {value!r}")


def check_non_negative(obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        require(math.isfinite(value) and value >= 0, name, f"must be >= 0, got {value!r}")


def check_fraction(obj: Any, name: str, low_open: bool = False, high_open: bool = False) -> None:
    value = getattr(obj, name)
    low = value > 0 if low_open else value >= 0
    high = value < 1 if high_open else value <= 1
    interval = f"{'(' if low_open else '['}0, 1{')' if high_open else ']'}"
    require(math.isfinite(value) and low and high, name, f"must be in {interval}, got {value!r}")


def did_you_mean(word: str, choices: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
