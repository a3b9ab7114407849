"""The settings of an experiment run: its `Config` with `--quick`, `--seeds` and strict
`key=value` overrides (a key must name a `Config` field, and its value must parse as that field's
type: `int`, `float`, `bool`, `str`, tuples of those; `ConfigError` otherwise).
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any

from .._errors import ConfigError

def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def coerce(name: str, typ, value: Any) -> Any:
    """`value` (a string from the command line, or an already parsed YAML value) as type `typ`.

    Strict: `bool` takes true/false only, `int` rejects floats and bools, `float` accepts ints,
    tuples take `a,b,c` or `[a, b, c]` and coerce every entry.
    """
    import yaml

    origin = typing.get_origin(typ)
    if isinstance(value, str) and typ is not str:
        text = value.strip()
        if origin is tuple and not text.startswith("["):
            text = "[" + text + "]"
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            raise ConfigError(f"{name}={value!r} does not parse; give a {_type_name(typ)}") from None
    if origin is tuple:
        args = typing.get_args(typ)
        item = args[0] if args else str
        if not isinstance(value, (list, tuple)) or not value:
            raise ConfigError(f"{name} must be a non-empty list like 1,2,3 (a {_type_name(typ)}), "
                              f"got {value!r}")
        return tuple(coerce(f"{name}[{i}]", item, v) for i, v in enumerate(value))
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if value is None:
            return None
        return coerce(name, args[0], value)
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    if typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if typ is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    if typ is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{name} must be a string, got {value!r}")
    raise ConfigError(f"{name} has unsupported type {typ!r} in the experiment's Config")


def _type_name(typ) -> str:
    origin = typing.get_origin(typ)
    if origin is tuple:
        args = typing.get_args(typ)
        return f"list of {getattr(args[0], '__name__', args[0]) if args else 'values'}"
    return getattr(typ, "__name__", str(typ))


def parse_overrides(items: list[str]) -> dict[str, str]:
    """`["a=1", "b=x"]` -> `{"a": "1", "b": "x"}` (values still strings)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not key=value; write e.g. seeds=5")
        out[key] = value
    return out


def resolve_config(module, *, quick: bool = False, seeds: int | None = None,
                   overrides: dict[str, Any] | None = None):
    """The experiment's `Config`: defaults, then `QUICK` (if `quick`), then `seeds`, then
    `overrides` (strict: unknown keys and wrong types raise `ConfigError`)."""
    cls = module.Config
    types = _field_types(cls)
    values: dict[str, Any] = {}
    if quick:
        values.update(module.QUICK)
    if seeds is not None:
        if "seeds" not in types:
            raise ConfigError(f"experiment {module.NAME!r} is deterministic and takes no --seeds")
        if seeds < 1:
            raise ConfigError(f"--seeds must be >= 1, got {seeds}")
        values["seeds"] = seeds
    for key, value in (overrides or {}).items():
        if key not in types:
            raise ConfigError(f"unknown key {key!r} for experiment {module.NAME!r}; known keys: "
                              f"{', '.join(types)}")
        values[key] = coerce(key, types[key], value)
    try:
        return cls(**values)
    except (TypeError, ValueError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"invalid config for experiment {module.NAME!r}: {err}") from err


def config_dict(cfg) -> dict[str, Any]:
    """The config as plain YAML-able values (tuples become lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}


# ---------------------------------------------------------------------------------------------
# Run directories
