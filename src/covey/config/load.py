"""Reading recipes: TOML files or text, `--set section.key=value` overrides, and back to TOML.

Unknown keys and wrong types are errors that name the source (the recipe or the `--set` flag),
the key, the value and what is allowed; the ranges and cross-section rules are the schema's
(`covey.config.schema`), reported here with the same source.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from covey.config.checks import SettingError, did_you_mean
from covey.config.schema import RunConfig, flatten
from covey.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib  # type: ignore[import-not-found,unused-ignore]


def load_recipe(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a TOML recipe (or the defaults when `path` is None) and apply `key=value` overrides.

    The whole recipe is checked here, before anything runs: unknown keys, types, choices, ranges
    and cross-section rules. Errors name the source (the recipe file or the `--set` flag), the
    key, the value and what is allowed.
    """
    tree: dict[str, Any] = {}
    where = "defaults"
    if path is not None:
        where = str(path)
        try:
            tree = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path}: recipe not found") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: invalid TOML ({e})") from None
    sources: dict[str, str] = {}
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(
                f"--set {item!r}: expected section.key=value, e.g. --set train.lr=1e-4"
            )
        *sections, name = key.strip().split(".")
        node = tree
        for s in sections:
            child = node.setdefault(s, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item}: {s} is a setting, not a section")
            node = child
        node[name] = _parse_value(raw.strip())
        sources[key.strip()] = f"--set {item.strip()}"
    cfg: RunConfig = _build(RunConfig, tree, _Sources(where, sources), "")
    return cfg


@dataclass
class _Sources:
    """Where each setting came from, for error messages: a `--set` flag or the recipe."""

    recipe: str
    overrides: dict[str, str]

    def of(self, key: str) -> str:
        """The `--set` flag that set `key` (or a key below it), else the recipe."""
        for set_key, flag in self.overrides.items():
            if set_key == key or set_key.startswith(f"{key}.") or key.startswith(f"{set_key}."):
                return flag
        return self.recipe


def load_recipe_text(text: str, where: str) -> RunConfig:
    """A recipe held as TOML text (a task bundle's), checked as `load_recipe` checks files."""
    try:
        tree = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{where}: invalid TOML ({e})") from None
    cfg: RunConfig = _build(RunConfig, tree, _Sources(where, {}), "")
    return cfg


def to_toml(cfg: RunConfig) -> str:
    """Render a config as a TOML recipe that `load_recipe` reads back to the same config."""
    lines = []
    for section, values in cfg.to_dict().items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            if value is None:
                continue  # TOML has no null; absent means the default (None)
            lines.append(f"{key} = {json.dumps(value)}")
        lines.append("")
    return "\n".join(lines)


def _parse_value(raw: str) -> Any:
    """`--set` values are TOML values; a bare word is taken as a string."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def _build(cls: type, tree: dict[str, Any], sources: _Sources, prefix: str) -> Any:
    section = prefix.rstrip(".")
    if not isinstance(tree, dict):
        raise ConfigError(f"{sources.of(section)}: [{section}] must be a table")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(tree) - known)
    if unknown:
        key = f"{prefix}{unknown[0]}"
        where = f"[{section}]" if prefix else "a recipe"
        raise ConfigError(
            f"{sources.of(key)}: unknown setting {key}{did_you_mean(unknown[0], known)}; "
            f"known in {where}: {', '.join(sorted(known))}"
        )
    kwargs = {}
    for name, value in tree.items():
        hint = hints[name]
        key = f"{prefix}{name}"
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(typing.cast(type, hint), value, sources, f"{key}.")
        else:
            kwargs[name] = _coerce(hint, value, sources.of(key), key)
    try:
        return cls(**kwargs)
    except SettingError as e:
        key = e.name if "." in e.name else f"{prefix}{e.name}"
        raise ConfigError(f"{sources.of(key)}: {key} {e.message}") from None


def _coerce(hint: Any, value: Any, where: str, key: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is Literal:
        if value not in args or isinstance(value, bool):
            raise ConfigError(
                f"{where}: {key} = {value!r} is not one of: {', '.join(map(str, args))}"
                f"{did_you_mean(str(value), map(str, args))}"
            )
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, where, key)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: {key} must be a list, got {value!r}")
        return [_coerce(args[0], v, where, key) for v in value]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and not (
        isinstance(value, hint) and not (hint is int and isinstance(value, bool))
    ):
        raise ConfigError(
            f"{where}: {key} must be {hint.__name__}, got {type(value).__name__} {value!r}"
        )
    return value


def config_differences(old: RunConfig, new: RunConfig, exclude: tuple[str, ...] = ()) -> list[str]:
    """`key: old -> new` for every setting that differs (for resume errors)."""
    a, b = flatten(old.to_dict()), flatten(new.to_dict())
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(a | b) if k not in exclude
            and a.get(k) != b.get(k)]  # fmt: skip
