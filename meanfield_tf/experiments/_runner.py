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

import datetime
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable

import jax

from .._errors import ConfigError, InputError
from ..workflow.rundir import git_commit
from . import MODULES, NAMES, get
from ._settings import _field_types, coerce, config_dict, parse_overrides, resolve_config  # noqa: F401

RESULTS = "results.json"
MANIFEST = "manifest.json"
CONFIG = "config.yaml"
PROGRESS = "progress.log"


# ---------------------------------------------------------------------------------------------
# Config resolution


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
        "git_commit": git_commit(),
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
