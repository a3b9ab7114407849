"""Strict configuration machinery: frozen dataclasses read from plain data and YAML.

`from_dict(Cls, data)` builds a dataclass (nested sections included), rejecting unknown keys,
wrong types and bad values with a one-line `ConfigError` that names the key and the fix;
`to_dict` gives the resolved configuration back. `read_yaml` reads a file; `apply_overrides`
applies dotted command-line overrides (`train.steps=200`) to plain data.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from ..._errors import ConfigError, InputError

# ---------------------------------------------------------------------------------------------
# Generic strict dataclass <-> dict machinery


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value, tp, where: str):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for opt in options:
            if opt is type(None):
                continue
            try:
                return _coerce(value, opt, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping of {_type_name(tp)} fields, got {value!r}")
        return from_dict(tp, value, where)
    if origin is list:
        (item,) = typing.get_args(tp) or (Any,)
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list, got {type(value).__name__} {value!r}")
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {type(value).__name__} {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            # YAML 1.1 reads "1e-3" (no dot) as a string: accept numeric strings
            if isinstance(value, str):
                try:
                    return float(value)
                except ValueError:
                    pass
            raise ConfigError(f"{where} must be a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {type(value).__name__} {value!r}")
        return value
    return value


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def from_dict(cls, data: dict, where: str = ""):
    """Build dataclass `cls` from `data`, strictly: unknown keys and wrong types raise ConfigError."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown key {_join(where, unknown[0])!r}; known keys{' of ' + where if where else ''}: "
            f"{', '.join(sorted(fields))}"
        )
    kwargs = {name: _coerce(data[name], hints[name], _join(where, name)) for name in data}
    try:
        return cls(**kwargs)
    except (ValueError, InputError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"{where or 'config'}: {err}") from None


def to_dict(obj) -> dict:
    """The resolved configuration as plain YAML-serialisable data."""
    return dataclasses.asdict(obj)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` → (["a", "b", "c"], value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value (e.g. train.steps=200)")
    key, _, raw = text.partition("=")
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else "parse error"
        raise ConfigError(f"override {text!r}: value is not valid YAML ({first}); quote it "
                          f"or fix its syntax") from None
    check_size(value, f"override {text!r}")
    return path, value


# Sections whose `name` selects a kind of section (a union of dataclasses): only there does a
# different name start the section afresh. Elsewhere `name` is an ordinary key (`solver.name`
# is the ODE method, and `solver.name=heun` must keep the solver's kernel, steps, ...).
KIND_SECTIONS = frozenset({"task"})


def _selects_kind(path: tuple[str, ...]) -> bool:
    return len(path) == 2 and path[0] in KIND_SECTIONS and path[1] == "name"


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply dotted overrides to nested dict `data` (in place) and return it.

    An override changes its key and nothing else, except `task.name=...` (a section of
    `KIND_SECTIONS`): a different name selects another kind of task, whose other keys start
    from that kind's defaults.
    """
    for text in overrides or []:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {text!r}: {part} is not a section")
            node = nxt
        if _selects_kind(tuple(path)) and node.get("name", value) != value:
            node.clear()
        node[path[-1]] = value
    return data


def merge(base: dict, data: dict) -> dict:
    """`data` laid over `base` key by key (nested mappings merged, lists and values replaced).

    A section of `KIND_SECTIONS` whose `name` differs from the base's (another task) replaces it
    whole.
    """
    out = dict(base)
    for key, value in data.items():
        old = out.get(key)
        other_kind = (key in KIND_SECTIONS and isinstance(value, dict) and isinstance(old, dict)
                      and value.get("name", old.get("name")) != old.get("name"))
        if isinstance(old, dict) and isinstance(value, dict) and not other_kind:
            out[key] = merge(old, value)
        else:
            out[key] = value
    return out


MAX_NODES = 100_000


def check_size(data, where: str) -> None:
    """Raise `ConfigError` if `data` (as loaded from YAML) is recursive (an alias to itself) or
    expands to more than `MAX_NODES` values (an alias bomb)."""
    count = 0
    stack = [(data, ())]
    while stack:
        node, ancestors = stack.pop()
        count += 1
        if count > MAX_NODES:
            raise ConfigError(f"{where} expands to more than {MAX_NODES} values (nested YAML "
                              f"aliases?); write the values out")
        if isinstance(node, (dict, list)):
            if id(node) in ancestors:
                raise ConfigError(f"{where} is recursive (a YAML alias refers to itself); "
                                  f"remove the alias")
            children = node.values() if isinstance(node, dict) else node
            inner = ancestors + (id(node),)
            stack.extend((c, inner) for c in children)


def read_yaml(path) -> dict:
    """The mapping in a YAML file (`{}` for an empty file); `ConfigError` if it is not one."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} is not a file; give a YAML file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"config file {str(path)!r} is not UTF-8 text; save it as UTF-8") from None
    except yaml.YAMLError as err:
        first = str(err).splitlines()[0] if str(err) else "parse error"
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {first}") from None
    check_size(data, f"config file {str(path)!r}")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping at top level")
    return data


def load_config(cls, path=None, overrides: list[str] | None = None):
    """Dataclass `cls` from its defaults, an optional YAML file laid over them, and dotted
    overrides laid over that: every key not given keeps its resolved default."""
    data = merge(to_dict(cls()), read_yaml(path) if path is not None else {})
    return from_dict(cls, apply_overrides(data, overrides or []))
