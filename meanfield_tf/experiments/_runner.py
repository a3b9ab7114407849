"""Run an experiment into a run directory.

A run directory holds:

- `config.yaml`: the resolved `Config` (defaults, then `--quick`, then `--seeds`, then overrides);
- `manifest.json`: experiment, claim, versions, python, platform, CPU count, devices, seed, git
  commit, the command that reproduces the run, start/end time, wall seconds, status;
- `progress.log`: the progress lines (also printed on stderr);
- `results.json`: what the experiment's `run` returned;
- `figures/*.png`.

Overrides are strict: `key=value` must name a `Config` field (`ConfigError` lists the known ones)
and its value must parse as that field's type (`int`, `float`, `bool`, `str`, tuples of those).
"""

from __future__ import annotations

import jax

import dataclasses
import datetime
import json
import math
import os
import platform
import sys
import time
import typing
from pathlib import Path
from typing import Any, Callable

from .._errors import ConfigError, InputError
from . import MODULES, NAMES, get

RESULTS = "results.json"
MANIFEST = "manifest.json"
CONFIG = "config.yaml"
PROGRESS = "progress.log"


# ---------------------------------------------------------------------------------------------
# Config resolution


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


def is_run_dir(path: Path, name: str | None = None) -> bool:
    """True if `path` holds an experiment manifest (of experiment `name`, when given)."""
    try:
        man = json.loads((Path(path) / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(man, dict) and "experiment" in man and (name is None
                                                              or man["experiment"] == name)


def check_out_dir(out: Path, name: str) -> None:
    """Refuse a non-empty `out` that is not a run directory of experiment `name`."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {str(out)!r} is a file; give a directory")
    if out.is_dir() and any(out.iterdir()) and not is_run_dir(out, name):
        raise InputError(f"--out {str(out)!r} is not empty and is not a run directory of "
                         f"experiment {name!r}; give a new or empty directory")


def default_out(name: str) -> Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / "experiments" / f"{name}-{stamp}"


def _jsonable(obj):
    """Convert NumPy/JAX scalars and arrays (recursively) to JSON types; NaN/inf become None."""
    import numpy as np

    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(float(obj)) else None
    if hasattr(obj, "shape") and hasattr(obj, "dtype"):
        return _jsonable(np.asarray(obj).tolist())
    return obj


def _write_json(path: Path, data) -> None:
    from ..workflow.files import atomic_write

    text = json.dumps(_jsonable(data), indent=2) + "\n"
    atomic_write(path, lambda fh: fh.write(text.encode()))


def machine() -> dict[str, Any]:
    """Where the run happens: platform, CPU count, backend and devices."""

    return {
        "platform": platform.platform(),
        "processor": platform.machine(),
        "cpu_count": os.cpu_count(),
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
    }


def _versions() -> dict[str, str | None]:
    from importlib import metadata

    out = {}
    for pkg in ("meanfield_tf", "jax", "jaxlib", "equinox", "diffrax", "optax", "ott-jax", "numpy",
                "matplotlib"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def _git_commit() -> str | None:
    """The commit of the source tree this package runs from (`-dirty` if modified), or None."""
    import subprocess

    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                              text=True, timeout=5)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=here, capture_output=True, text=True, timeout=5).stdout.strip()
        return head.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def reproduce_command(name: str, quick: bool, seeds: int | None,
                      overrides: dict[str, Any]) -> str:
    """The one-experiment command line that reproduces a run."""
    parts = ["meanfield-tf", "experiment", "run", name]
    if quick:
        parts.append("--quick")
    if seeds is not None:
        parts += ["--seeds", str(seeds)]
    parts += [f"{k}={v}" for k, v in overrides.items()]
    return " ".join(parts)


class Progress:
    """Progress lines: `[  12.3s] message` on `stream` and appended to `progress.log`."""

    def __init__(self, path: Path, name: str, stream=None):
        self.path = Path(path)
        self.name = name
        self.stream = stream if stream is not None else sys.stderr
        self.t0 = time.perf_counter()

    def __call__(self, message: str) -> None:
        line = f"[{time.perf_counter() - self.t0:8.1f}s] {self.name}: {message}"
        print(line, file=self.stream, flush=True)
        with open(self.path, "a") as fh:
            fh.write(line + "\n")


def run_experiment(name: str, out: Path | str | None = None, *, quick: bool = False,
                   seeds: int | None = None, overrides: dict[str, Any] | None = None,
                   argv: list[str] | None = None, stream=None) -> tuple[Path, dict]:
    """Run experiment `name` into the run directory `out` (default
    `runs/experiments/<name>-<timestamp>`). Returns `(out, results)`.

    Raises `ConfigError` (unknown experiment, bad override) or `InputError` (bad `out`) before
    anything is written.
    """
    import yaml

    module = get(name)
    name = module.NAME
    overrides = dict(overrides or {})
    cfg = resolve_config(module, quick=quick, seeds=seeds, overrides=overrides)
    out = Path(out) if out is not None else default_out(name)
    check_out_dir(out, name)
    out.mkdir(parents=True, exist_ok=True)
    for stale in (RESULTS, PROGRESS):
        (out / stale).unlink(missing_ok=True)
    figures = out / "figures"
    if figures.is_dir():
        for png in figures.glob("*.png"):
            png.unlink()

    text = yaml.safe_dump(config_dict(cfg), sort_keys=False)
    (out / CONFIG).write_text(text)
    started = datetime.datetime.now(datetime.timezone.utc)
    manifest = {
        "experiment": name,
        "claim": module.CLAIM,
        "quick": quick,
        "seed": getattr(cfg, "seed", None),
        "command": reproduce_command(name, quick, seeds, overrides),
        "argv": argv,
        "versions": _versions(),
        "python": platform.python_version(),
        "machine": machine(),
        "git_commit": _git_commit(),
        "started": started.isoformat(timespec="seconds"),
        "status": "running",
    }
    _write_json(out / MANIFEST, manifest)
    progress = Progress(out / PROGRESS, name, stream)
    progress(f"config: {config_dict(cfg)}")
    t0 = time.perf_counter()
    status = "failed"
    try:
        x64 = bool(jax.config.jax_enable_x64)
        try:
            results = module.run(cfg, out, progress)
        finally:  # an experiment's precision does not leak into the next one
            jax.config.update("jax_enable_x64", x64)
        status = "done"
    finally:
        ended = datetime.datetime.now(datetime.timezone.utc)
        manifest.update(status=status, ended=ended.isoformat(timespec="seconds"),
                        wall_seconds=round(time.perf_counter() - t0, 2),
                        x64_after_run=bool(jax.config.jax_enable_x64))
        _write_json(out / MANIFEST, manifest)
    _write_json(out / RESULTS, results)
    progress(f"done in {manifest['wall_seconds']:.1f} s; results in {out / RESULTS}")
    return out, results


def run_all(out: Path | str | None = None, *, quick: bool = False, seeds: int | None = None,
            overrides: dict[str, Any] | None = None, argv: list[str] | None = None,
            stream=None, on_result: Callable | None = None) -> list[tuple[str, Path | None, Any]]:
    """Run every registered experiment into `out/<name>/`.

    An override applies to each experiment whose `Config` has that key (a key no experiment has
    is a `ConfigError`); `--seeds` applies to the random ones. A failing or unavailable
    experiment is reported and the others still run. Returns `(name, run dir or None, results or
    the error)` per experiment.
    """
    overrides = dict(overrides or {})
    out = Path(out) if out is not None else default_out("all")
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {str(out)!r} is a file; give a directory")
    if out.is_dir():
        strays = [p.name for p in out.iterdir() if p.name not in NAMES]
        if strays:
            raise InputError(f"--out {str(out)!r} holds {strays[0]!r}, which is not an experiment "
                             f"run directory; give a new or empty directory")
    modules = {}
    for name in NAMES:
        try:
            modules[name] = get(name)
        except ConfigError as err:
            modules[name] = err
    known = set()
    for m in modules.values():
        if not isinstance(m, Exception):
            known |= set(_field_types(m.Config))
    unknown = [k for k in overrides if k not in known]
    if unknown:
        raise ConfigError(f"unknown key {unknown[0]!r}: no experiment has it; known keys: "
                          f"{', '.join(sorted(known))}")
    report = []
    for name, module in modules.items():
        if isinstance(module, Exception):
            print(f"experiment {name}: skipped: {module}", file=stream or sys.stderr)
            report.append((name, None, module))
            continue
        fields = _field_types(module.Config)
        mine = {k: v for k, v in overrides.items() if k in fields}
        k = seeds if (seeds is not None and "seeds" in fields) else None
        try:
            path, results = run_experiment(name, out / name, quick=quick, seeds=k, overrides=mine,
                                           argv=argv, stream=stream)
            report.append((name, path, results))
            if on_result is not None:
                on_result(name, module, results)
        except Exception as err:  # one failure must not stop the others
            print(f"experiment {name}: failed: {type(err).__name__}: {err}",
                  file=stream or sys.stderr)
            report.append((name, out / name, err))
    return report


def format_table(rows: list[dict], fmt: str = "text") -> str:
    """`rows` as an aligned text table (`fmt="text"`) or a Markdown table (`fmt="markdown"`)."""
    if not rows:
        return "(no rows)"
    cols: list[str] = []
    for r in rows:
        for k in r:
            if k not in cols:
                cols.append(k)

    def cell(v) -> str:
        if isinstance(v, bool) or v is None:
            return str(v)
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    cells = [[cell(r.get(c, "")) for c in cols] for r in rows]
    if fmt == "markdown":
        lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in cells]
        return "\n".join(lines)
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


__all__ = ["MODULES", "NAMES", "run_experiment", "run_all", "resolve_config", "format_table"]
