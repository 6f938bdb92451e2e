"""Settings from layers (a TOML file, environment variables, flags): the loader `run` and
`serve` share.

Each layer keeps what it read and how to name one of its keys in a message (the file and the
key, the variable, the flag), so that a refusal says where the bad value came from. Layers
merge in order of precedence (tables merged key by key) and the result is validated once; an
environment variable with the settings' prefix that names no setting is refused, as a key of
the file would be.
"""

from __future__ import annotations

import difflib
import os
import tomllib
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsError,
)

from rlm_orchestrator.config.errors import Label, Loc, dotted, refusing
from rlm_orchestrator.exceptions import ConfigurationError

S = TypeVar("S", bound="LayeredSettings")


class LayeredSettings(BaseSettings):
    """Settings validated from the layers `load` reads: constructing one directly reads
    nothing else (no environment behind the caller's back)."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings,)


class Layer(NamedTuple):
    values: dict[str, Any]
    label: Label  # how a message names one of its keys


def read_toml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigurationError(f"{path}: the config file does not exist")
    try:
        with path.open("rb") as source:
            return tomllib.load(source)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigurationError(f"{path}: not a readable TOML file: {exc}") from None


def file_layer(path: Path, values: dict[str, Any], table: Loc = ()) -> Layer:
    """`values` read from `path` (from its `table`, when the settings are one of its tables)."""

    def label(loc: Loc) -> str:
        key = dotted((*table, *loc))
        return f"{path}: {key}" if key else str(path)

    return Layer(values, label)


def flag_layer(values: Mapping[str, Any], flags: Mapping[str, str]) -> Layer:
    """What command-line flags gave (None: not given); `flags` names the flag of each key."""

    def label(loc: Loc) -> str:
        return flags.get(dotted(loc)) or flags.get(str(loc[0]) if loc else "", "") or dotted(loc)

    return Layer(_without_none(values), label)


def env_layer(settings_cls: type[LayeredSettings], *, allowed: Collection[str] = ()) -> Layer:
    """The settings' environment variables (prefix, `__` for nested keys). A variable with the
    prefix that names no setting is refused, unless `allowed` lists it (a variable of the same
    prefix that means something else, e.g. the file's name)."""
    config = settings_cls.model_config
    prefix = str(config.get("env_prefix", "")).upper()
    delimiter = config.get("env_nested_delimiter") or "__"
    names = [name for name in os.environ if name.upper().startswith(prefix)]
    for name in names:
        setting = name.upper().removeprefix(prefix).split(delimiter)[0].lower()
        if name.upper() not in allowed and setting not in settings_cls.model_fields:
            known = [prefix + field.upper() for field in settings_cls.model_fields]
            close = difflib.get_close_matches(name.upper().split(delimiter)[0], known, n=1)
            hint = f"did you mean {close[0]}?" if close else f"the settings are {', '.join(known)}"
            raise ConfigurationError(f"{name}: names no setting ({hint})")
    try:
        values = EnvSettingsSource(settings_cls)()
    except SettingsError as exc:
        raise ConfigurationError(f"{prefix}* variables: {exc}") from None

    def label(loc: Loc) -> str:
        top = f"{prefix}{str(loc[0]).upper()}" if loc else prefix
        given = [n for n in names if n.upper() == top or n.upper().startswith(top + delimiter)]
        key = dotted(loc)
        return f"{' / '.join(given) or top} ({key})" if len(loc) > 1 else " / ".join(given) or top

    return Layer(values, label)


def load(settings_cls: type[S], layers: Sequence[Layer]) -> S:
    """The settings from `layers` (highest precedence first), validated once; a refusal is a
    one-line ConfigurationError naming the key and the layer it came from."""
    merged: dict[str, Any] = {}
    for layer in reversed(layers):
        merged = _merge(merged, layer.values)
    with refusing(_labeller(layers)):
        return settings_cls(**merged)


def _labeller(layers: Sequence[Layer]) -> Callable[[Loc], str]:
    def label(loc: Loc) -> str:
        for layer in layers:  # the layer that gave this very value
            if loc and _has(layer.values, loc):
                return layer.label(loc)
        for layer in layers:  # else the one that gave its table (a key missing from it)
            if loc and loc[0] in layer.values:
                return layer.label(loc)
        given = [layer for layer in layers if layer.values]
        return given[-1].label(loc) if given else dotted(loc)

    return label


def _has(values: Any, loc: Loc) -> bool:
    for part in loc:
        if not isinstance(values, dict | list):
            return False
        try:
            values = values[part]  # type: ignore[index]
        except (KeyError, IndexError, TypeError):
            return False
    return True


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _without_none(values: Mapping[str, Any]) -> dict[str, Any]:
    kept: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, Mapping):
            value = _without_none(value)
            if not value:
                continue
        if value is not None:
            kept[key] = value
    return kept
