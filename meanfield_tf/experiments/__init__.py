"""Experiments that reproduce the paper's claims, one module each, run by `meanfield-tf experiment`.

Every experiment module exposes the same interface:

- `NAME` (e.g. `"mean-field-limit"`) and `CLAIM` (one line: the claim it reproduces);
- `Config`, a frozen dataclass whose defaults are the full sizes (every field overridable by
  `key=value` on the command line, with strict types), with `seed` and, where random, `seeds`;
- `QUICK`, the field overrides of `--quick` (tiny, CPU-friendly sizes);
- `run(cfg, out, progress) -> dict`: runs, writes PNG figures into `out / "figures"`, and returns
  the `results.json` dict;
- `rows(results) -> list[dict]`: the table; `discussion(results) -> str`: one paragraph.

Modules are imported lazily (`get`), so a missing or broken experiment does not break the others.
This package is the application layer: it may import matplotlib or yaml, inside functions only.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from .._errors import ConfigError

# The registry, in the order `list` shows and `run all` runs them (module = NAME with - -> _).
MODULES = ("mean_field_limit", "gaussian_limit", "adjoint", "injectivity", "convergence",
           "width_depth", "clustering")
NAMES = tuple(m.replace("_", "-") for m in MODULES)

_REQUIRED = ("NAME", "CLAIM", "Config", "QUICK", "run", "rows", "discussion")


def get(name: str) -> ModuleType:
    """The experiment module called `name` (`"mean-field-limit"` or `"mean_field_limit"`).

    Raises `ConfigError` for an unknown name (listing the known ones) or a module that fails to
    import or lacks part of the interface.
    """
    key = name.replace("-", "_")
    if key not in MODULES:
        raise ConfigError(f"unknown experiment {name!r}; choose one of {', '.join(NAMES)} or 'all'")
    try:
        module = importlib.import_module(f".{key}", __name__)
    except Exception as err:  # a broken module must not take the others down
        raise ConfigError(f"experiment {key.replace('_', '-')!r} is unavailable: "
                          f"{type(err).__name__}: {err}") from err
    missing = [attr for attr in _REQUIRED if not hasattr(module, attr)]
    if missing:
        raise ConfigError(f"experiment module {key!r} lacks {', '.join(missing)}; it does not "
                          f"implement the experiment interface")
    return module


def list_experiments() -> list[tuple[str, str]]:
    """`(name, claim)` for every registered experiment, in order; an experiment that cannot be
    imported is listed with `"unavailable: <reason>"` instead of its claim."""
    out = []
    for name in NAMES:
        try:
            out.append((name, get(name).CLAIM))
        except ConfigError as err:
            out.append((name, f"unavailable: {err}"))
    return out
