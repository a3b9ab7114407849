"""Grids of runs: `meanfield-tf train --config C.yaml --sweep key=v1,v2 [--sweep ...] --seeds K`.

The grid is the cartesian product of the swept values; every grid point runs `K` times, with
the seeds `seed + 0, ..., seed + K-1` (`seed` from the config), unless `seed` itself is swept
(`--sweep seed=0,1,2`, then `K` must be 1). Each run has its own run directory under the sweep
directory, named for its grid point (`train.learning_rate=0.5,seed=1`), and its config's name
says the same. The sweep directory then holds

- `sweep.json`: the grid, every run's directory and final metrics, and the aggregate;
- `sweep.md`: the aggregate table, one row per grid point: the final metrics' mean ± standard
  error across seeds (standard error = sample standard deviation / √K; — for K = 1);
- `sweep.png`: those means with error bars against the first swept key, and the mean loss curve
  of every grid point with its standard-error band.

A sweep directory that already holds some of the runs (an interrupted sweep) is continued: the
finished runs are kept, and the others are run (or resumed from their last checkpoint).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
import yaml

from .._errors import ConfigError
from .compare import final_metrics, markdown_table
from .config import TrainConfig, load_train_config
from .files import atomic_write
from .results import RunResults
from .rundir import RunDir

AGGREGATED = ("loss", "smoothed_loss", "test_loss", "test_accuracy", "w2", "wall_s")


def parse_sweep(specs: list[str]) -> list[tuple[str, list]]:
    """`["train.learning_rate=0.5,1.0", ...]` → `[("train.learning_rate", [0.5, 1.0]), ...]`
    (each value read as YAML, as the KEY=VALUE overrides are)."""
    grid = []
    for spec in specs:
        key, sep, values = spec.partition("=")
        if not sep or not key or not values:
            raise ConfigError(f"--sweep {spec!r} must look like section.key=v1,v2,...")
        parsed = [yaml.safe_load(v) for v in values.split(",")]
        if any(k == key for k, _ in grid):
            raise ConfigError(f"--sweep names {key} twice; give all its values in one flag")
        grid.append((key, parsed))
    return grid


def _word(v) -> str:
    return json.dumps(v) if isinstance(v, (list, dict)) else str(v)


def point_name(values: dict) -> str:
    """The directory name of a grid point: `key=value,...` (path separators replaced)."""
    name = ",".join(f"{k}={_word(v)}" for k, v in values.items())
    return name.replace("/", "_").replace("\\", "_").replace(" ", "")


def plan(config_path, overrides: list[str], grid: list[tuple[str, list]], seeds: int
         ) -> list[tuple[dict, int, TrainConfig]]:
    """Every run of the sweep: `(grid values, seed, config)`, grid points in order. Every config
    is validated before anything runs."""
    if seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {seeds}")
    swept = [k for k, _ in grid]
    if "seed" in swept and seeds > 1:
        raise ConfigError("--sweep seed=... gives the seeds itself; drop --seeds")
    base = load_train_config(config_path, overrides)
    runs = []
    for combo in itertools.product(*(vals for _, vals in grid)):
        values = dict(zip(swept, combo))
        point = [f"{k}={_word(v)}" for k, v in values.items()]
        for j in range(seeds):
            seed = values["seed"] if "seed" in values else base.seed + j
            name = point_name({**values, "seed": seed})
            cfg = load_train_config(config_path, [*overrides, *point, f"seed={seed}"])
            cfg = dataclasses.replace(cfg, name=f"{base.name}-{name}")
            runs.append((values, seed, cfg))
    return runs


def _mean_sem(xs: list) -> tuple[float, float]:
    a = np.asarray([x for x in xs if x is not None and np.isfinite(x)], float)
    if not len(a):
        return float("nan"), float("nan")
    sem = float(a.std(ddof=1) / np.sqrt(len(a))) if len(a) > 1 else float("nan")
    return float(a.mean()), sem


def _curve(results: list[RunResults]):
    """`(steps, mean, sem)` of the training loss over the runs' common logged steps."""
    cols = [r.train for r in results if len(r.train.get("loss", []))]
    if not cols:
        return None
    common = sorted(set.intersection(*(set(c["step"].tolist()) for c in cols)))
    losses = np.array([[dict(zip(c["step"].tolist(), c["loss"]))[s] for s in common]
                       for c in cols])
    sem = (losses.std(0, ddof=1) / np.sqrt(len(cols)) if len(cols) > 1
           else np.full(len(common), np.nan))
    return [common, losses.mean(0).tolist(), sem.tolist()]


def aggregate(grid, runs: list[tuple[dict, int, Path]]) -> list[dict[str, Any]]:
    """One entry per grid point: its values, seeds, run directories and, for every metric of
    `AGGREGATED`, `<metric>_mean` and `<metric>_sem` across its seeds."""
    points: dict[str, dict] = {}
    for values, seed, path in runs:
        p = points.setdefault(point_name(values) or "base", {"values": values, "seeds": [],
                                                             "runs": [], "_results": []})
        r = RunResults(path)
        p["seeds"].append(seed)
        p["runs"].append(str(path))
        p["_results"].append(r)
    out = []
    for label, p in points.items():
        finals = [final_metrics(r) for r in p["_results"]]
        entry = {"label": label, "values": p["values"], "seeds": p["seeds"], "runs": p["runs"]}
        for m in AGGREGATED:
            entry[f"{m}_mean"], entry[f"{m}_sem"] = _mean_sem([f[m] for f in finals])
        entry["curve"] = _curve(p["_results"])
        out.append(entry)
    return out


def _pm(mean, sem) -> str:
    if not np.isfinite(mean):
        return "—"
    return f"{mean:.4g}" + (f" ± {sem:.2g}" if np.isfinite(sem) else "")


def run_sweep(config_path, overrides: list[str], grid, seeds: int, out, *,
              train: Callable | None = None, report: Callable[[str], None] = print,
              argv: list[str] | None = None, figures: bool = True) -> dict[str, Any]:
    """Run every run of the sweep under the directory `out` and write its aggregate (see the
    module docstring). Returns the `sweep.json` contents."""
    if train is None:
        from .training import train
    out = Path(out)
    todo = plan(config_path, overrides, grid, seeds)
    done = []
    for i, (values, seed, cfg) in enumerate(todo):
        path = out / point_name({**values, "seed": seed})
        rd = RunDir(path)
        finished = rd.is_run() and any(s == cfg.train.steps for s, _ in rd.checkpoints())
        if finished:
            report(f"[{i + 1}/{len(todo)}] {path.name}: already finished")
        else:
            report(f"[{i + 1}/{len(todo)}] {path.name}")
            train(cfg, path, resume=rd.is_run(), argv=argv, progress=False, figures=figures)
        done.append((values, seed, path))
    points = aggregate(grid, done)
    shown = [m for m in AGGREGATED if any(np.isfinite(p[f"{m}_mean"]) for p in points)]
    keys = [k for k, _ in grid]
    md = (f"Sweep of `{config_path or 'the default config'}` over "
          f"{', '.join(keys) or 'seeds only'}; {seeds} seed(s) per point; mean ± standard error "
          f"across seeds.\n\n")
    md += markdown_table([*keys, "seeds", *shown],
                         [[*(_word(p["values"][k]) for k in keys), len(p["seeds"]),
                           *(_pm(p[f"{m}_mean"], p[f"{m}_sem"]) for m in shown)] for p in points])
    atomic_write(out / "sweep.md", lambda f: f.write(md.encode()))
    summary = {"config": str(config_path) if config_path else None, "overrides": overrides,
               "grid": [[k, v] for k, v in grid], "seeds": seeds, "points": points}
    text = json.dumps(summary, indent=2, default=float).encode()
    atomic_write(out / "sweep.json", lambda f: f.write(text))
    from .figures_compare import plot_sweep

    figure_metrics = [m for m in ("loss", "test_loss", "test_accuracy") if m in shown][:2]
    plot_sweep(out / "sweep.png", points, figure_metrics or ["loss"])
    summary["files"] = [str(out / "sweep.md"), str(out / "sweep.json"), str(out / "sweep.png")]
    return summary
