"""Configuration: dataclasses read from YAML, strictly.

Every section is a frozen dataclass. `load_config(Cls, path, overrides)` reads a YAML file, applies
dotted command-line overrides (`train.steps=200`), and builds the dataclasses, rejecting unknown
keys, wrong types and bad values with a one-line `ConfigError` that names the key and the fix.
`config_to_dict` gives the resolved configuration back, to be written into a run directory.

This module sits above the numerics: it turns plain data into library objects (families, heads).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Optional

import yaml

from ._errors import ConfigError, InputError

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


def config_to_dict(obj) -> dict:
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
        raise ConfigError(f"override {text!r}: value is not valid YAML ({err})") from None
    return path, value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply dotted overrides to nested dict `data` (in place) and return it."""
    for text in overrides or []:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {text!r}: {part} is not a section")
            node = nxt
        node[path[-1]] = value
    return data


def read_yaml(path) -> dict:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        first = str(err).splitlines()[0] if str(err) else "parse error"
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {first}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping at top level")
    return data


def load_config(cls, path=None, overrides: list[str] | None = None):
    """Dataclass `cls` from an optional YAML file plus dotted overrides."""
    data = read_yaml(path) if path is not None else {}
    apply_overrides(data, overrides or [])
    return from_dict(cls, data)


# ---------------------------------------------------------------------------------------------
# Sections shared by the commands


def _positive(where: str, value, allow_none=False):
    if value is None and allow_none:
        return
    if value is None or value <= 0:
        raise ConfigError(f"{where} must be > 0, got {value!r}")


@dataclasses.dataclass(frozen=True)
class TokensConfig:
    """Token sequences drawn from analytic families.

    `families` is a list of specs, one per sequence, e.g. `{family: gaussian, mean: [0, 0],
    cov: [[1, 0], [0, 1]]}`; `copies: k` in a spec repeats it k times (independent samples).
    Families: gaussian (mean, cov), mixture (weights, means, covs), box (low, high),
    ball (center, radius), discrete (atoms, weights).
    """

    n: int = 32
    families: list[dict] = dataclasses.field(
        default_factory=lambda: [
            {"family": "gaussian", "mean": [0.0, 0.0], "cov": [[1.0, 0.0], [0.0, 1.0]], "copies": 4}
        ]
    )

    def __post_init__(self):
        _positive("tokens.n", self.n)
        if not self.families:
            raise ConfigError("tokens.families must list at least one sequence family")
        for i, spec in enumerate(self.families):
            family_specs_check(spec, f"tokens.families[{i}]")


@dataclasses.dataclass(frozen=True)
class HeadsConfig:
    """The initial head measure: `layers` cells × `heads` particles in dimension `dim`."""

    layers: int = 8
    heads: int = 16
    dim: int = 2
    init: str = "gaussian"  # gaussian | symmetric
    scale_A: float = 1.0
    scale_V: float = 1.0
    mean_A: float = 0.0  # A = mean_A I + noise
    mean_V: float = 0.0  # V = mean_V I + noise (gaussian init only)
    rank: Optional[int] = None  # factored heads (Q, K of rank k) when set
    interpolation: str = "piecewise"  # piecewise | linear

    def __post_init__(self):
        for name in ("layers", "heads", "dim"):
            _positive(f"heads.{name}", getattr(self, name))
        _positive("heads.rank", self.rank, allow_none=True)
        if self.init not in ("gaussian", "symmetric"):
            raise ConfigError(f"heads.init must be 'gaussian' or 'symmetric', got {self.init!r}")
        if self.init == "symmetric" and self.heads % 2:
            raise ConfigError(f"heads.init=symmetric needs an even heads count, got {self.heads}")
        if self.interpolation not in ("piecewise", "linear"):
            raise ConfigError(
                f"heads.interpolation must be 'piecewise' or 'linear', got {self.interpolation!r}"
            )
        if self.init == "symmetric" and self.mean_V:
            raise ConfigError("heads.mean_V must be 0 with init=symmetric (pairs (A, V), (A, -V))")
        if self.scale_A < 0 or self.scale_V < 0:
            raise ConfigError("heads.scale_A and heads.scale_V must be >= 0")


@dataclasses.dataclass(frozen=True)
class SolverConfig:
    """The depth solver: `name` (euler, heun, midpoint, rk4, tsit5, dopri5, ...), `steps` total
    fixed steps (a multiple of L; default L) or `rtol`/`atol` for adaptive steps; the kernel."""

    name: str = "euler"
    steps: Optional[int] = None
    rtol: Optional[float] = None
    atol: Optional[float] = None
    kernel: str = "dense"  # dense | chunked
    chunk_size: int = 256

    def __post_init__(self):
        _positive("solver.steps", self.steps, allow_none=True)
        _positive("solver.rtol", self.rtol, allow_none=True)
        _positive("solver.atol", self.atol, allow_none=True)
        _positive("solver.chunk_size", self.chunk_size)
        if self.kernel not in ("dense", "chunked"):
            raise ConfigError(f"solver.kernel must be 'dense' or 'chunked', got {self.kernel!r}")


@dataclasses.dataclass(frozen=True)
class SimulateConfig:
    """`meanfield-tf simulate --config`: tokens and heads generated from families with a seed."""

    seed: int = 0
    dtype: str = "float32"
    tokens: TokensConfig = dataclasses.field(default_factory=TokensConfig)
    heads: HeadsConfig = dataclasses.field(default_factory=HeadsConfig)
    solver: SolverConfig = dataclasses.field(default_factory=SolverConfig)
    num_saves: Optional[int] = None  # save at this many uniform depths (default: every layer edge)

    def __post_init__(self):
        if self.dtype not in ("float32", "float64"):
            raise ConfigError(f"dtype must be float32 or float64, got {self.dtype!r}")
        _positive("num_saves", self.num_saves, allow_none=True)


# ---------------------------------------------------------------------------------------------
# From specs to library objects

_FAMILY_KEYS = {
    "gaussian": ("mean", "cov"),
    "mixture": ("weights", "means", "covs"),
    "box": ("low", "high"),
    "ball": ("center", "radius"),
    "discrete": ("atoms", "weights"),
}
_OPTIONAL_KEYS = {"discrete": ("weights",)}


def family_specs_check(spec, where: str) -> None:
    """Raise ConfigError unless `spec` is a well-formed family spec (keys only, not values)."""
    if not isinstance(spec, dict) or "family" not in spec:
        raise ConfigError(f"{where} must be a mapping with a 'family' key ({', '.join(_FAMILY_KEYS)})")
    fam = spec["family"]
    if fam not in _FAMILY_KEYS:
        raise ConfigError(f"{where}.family {fam!r} is unknown; choose one of {', '.join(_FAMILY_KEYS)}")
    allowed = set(_FAMILY_KEYS[fam]) | {"family", "copies"}
    unknown = sorted(set(spec) - allowed)
    if unknown:
        raise ConfigError(
            f"unknown key {where}.{unknown[0]} for family {fam}; known keys: {', '.join(sorted(allowed))}"
        )
    missing = [k for k in _FAMILY_KEYS[fam] if k not in spec and k not in _OPTIONAL_KEYS.get(fam, ())]
    if missing:
        raise ConfigError(f"{where} (family {fam}) lacks key {missing[0]}")
    copies = spec.get("copies", 1)
    if isinstance(copies, bool) or not isinstance(copies, int) or copies < 1:
        raise ConfigError(f"{where}.copies must be a positive integer, got {copies!r}")


def family_from_spec(spec: dict, where: str = "family", dtype=None):
    """A `Discrete`/`Gaussian`/`GaussianMixture`/`UniformBox`/`UniformBall` from its spec."""
    import jax.numpy as jnp

    from ._tokens import Discrete, Gaussian, GaussianMixture, UniformBall, UniformBox

    family_specs_check(spec, where)
    dtype = dtype or jnp.result_type(float)
    a = {k: jnp.asarray(v, dtype) for k, v in spec.items() if k not in ("family", "copies")}
    build = {
        "gaussian": lambda: Gaussian(a["mean"], a["cov"]),
        "mixture": lambda: GaussianMixture(a["weights"], a["means"], a["covs"]),
        "box": lambda: UniformBox(a["low"], a["high"]),
        "ball": lambda: UniformBall(a["center"], a["radius"]),
        "discrete": lambda: Discrete(a["atoms"], a.get("weights")),
    }[spec["family"]]
    try:
        return build()
    except (InputError, TypeError, ValueError) as err:
        raise ConfigError(f"{where}: {err}") from None


def families_from_config(specs: list[dict], dtype=None) -> list:
    """Expand `copies` and build every family of a list of specs."""
    out = []
    for i, spec in enumerate(specs):
        fam = family_from_spec(spec, f"tokens.families[{i}]", dtype)
        out.extend([fam] * spec.get("copies", 1))
    return out


def tokens_from_config(cfg: TokensConfig, key, dtype):
    """Sample the token batch a `TokensConfig` describes."""
    from ._tokens import sample_tokens

    fams = families_from_config(cfg.families, dtype)
    try:
        return sample_tokens(key, fams, cfg.n)
    except InputError as err:
        raise ConfigError(f"tokens: {err}") from None


def heads_from_config(cfg: HeadsConfig, key, dtype):
    """Initialise the head measure a `HeadsConfig` describes."""
    from ._heads import gaussian_heads, symmetric_heads

    common = dict(scale_A=cfg.scale_A, scale_V=cfg.scale_V, mean_A=cfg.mean_A, rank=cfg.rank,
                  interpolation=cfg.interpolation, dtype=dtype)
    if cfg.init == "gaussian":
        return gaussian_heads(key, cfg.layers, cfg.heads, cfg.dim, mean_V=cfg.mean_V, **common)
    return symmetric_heads(key, cfg.layers, cfg.heads, cfg.dim, **common)
