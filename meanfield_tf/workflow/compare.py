"""Several runs side by side: `meanfield-tf compare RUN... --out DIR`.

`compare_runs(paths, out)` reads each run directory (config and metrics only: nothing is
rebuilt or recompiled) and writes into `out`

- `compare.png`: the training loss of every run against training time τ = Σ lr and against the
  step (test loss dashed where the task has a test set), and the distance W2,c of the heads from
  their initial measure against the step;
- `compare.md` and `compare.json`: one row per run with its final metrics, and the config keys
  whose values differ between the runs (dotted, e.g. `train.learning_rate`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from .._errors import InputError
from .config import to_dict
from .files import atomic_write
from .results import RunResults

# the final metrics of a run, in table order: (column, heading)
FINAL = (("step", "steps"), ("time", "τ"), ("first_loss", "first loss"), ("loss", "loss"),
         ("smoothed_loss", "loss (mean of last 10%)"), ("test_loss", "test loss"),
         ("test_accuracy", "test accuracy"), ("w2", "W2,c"), ("wall_s", "wall s"))
# keys that never make two runs different experiments
_IGNORED = ("name", "distributed.")


def flat_config(cfg) -> dict[str, Any]:
    """The resolved config as `{dotted key: value}` (lists kept whole)."""
    out = {}

    def walk(data, prefix):
        for k, v in data.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                out[f"{prefix}{k}"] = v
    walk(to_dict(cfg), "")
    return out


def config_differences(configs: list) -> dict[str, list]:
    """`{dotted key: [value in run 0, value in run 1, ...]}` for every key that differs."""
    flats = [flat_config(c) for c in configs]
    keys = sorted(set().union(*flats))
    diff = {}
    for k in keys:
        if k.startswith(_IGNORED):
            continue
        values = [f.get(k) for f in flats]
        if any(v != values[0] for v in values[1:]):
            diff[k] = values
    return diff


def final_metrics(r: RunResults) -> dict[str, Any]:
    """First and final loss, the loss averaged over the last 10% of logged steps, training time,
    wall time, and the last evaluation's W2,c and test metrics (`None` when absent)."""
    tr, ev = r.train, r.eval
    out: dict[str, Any] = {k: None for k, _ in FINAL}
    if len(tr.get("loss", [])):
        loss = tr["loss"]
        tail = loss[-max(1, len(loss) // 10):]
        out.update(step=int(tr["step"][-1]) + 1, first_loss=float(loss[0]), loss=float(loss[-1]),
                   smoothed_loss=float(np.mean(tail)),
                   time=float(tr["time"][-1] + tr["lr"][-1]) if "time" in tr else None,
                   wall_s=float(tr["wall_s"][-1]) if "wall_s" in tr else None)
    for k in ("test_loss", "test_accuracy", "w2", "wall_s"):
        if k in ev and len(ev[k]) and np.isfinite(ev[k][-1]):
            out[k] = float(ev[k][-1]) if k != "wall_s" else max(out[k] or 0.0, float(ev[k][-1]))
    return out


def labels(runs: list[RunResults]) -> list[str]:
    """A label per run: its config name, or its directory name when names repeat."""
    names = [r.config.name or r.path.name for r in runs]
    if len(set(names)) < len(names):
        names = [r.path.name for r in runs]
    return names


def _fmt(v) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def markdown_table(header: list[str], rows: list[list]) -> str:
    """A Markdown table (values formatted to 4 significant digits, `None` as —)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def compare_runs(paths: list, out) -> dict[str, Any]:
    """Write the comparison of the run directories `paths` into `out` (see the module docstring).
    Returns `{"runs": [...], "differences": {...}, "files": [...]}`."""
    if len(paths) < 1:
        raise InputError("give at least one run directory to compare")
    runs = [RunResults(p) for p in paths]
    names = labels(runs)
    diff = config_differences([r.config for r in runs])
    finals = [final_metrics(r) for r in runs]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"runs": [{"label": n, "path": str(r.path), "final": f,
                        "config": {k: v[i] for k, v in diff.items()}}
                       for i, (n, r, f) in enumerate(zip(names, runs, finals))],
              "differences": diff}
    text = json.dumps(report, indent=2).encode()
    atomic_write(out / "compare.json", lambda f: f.write(text))
    shown = [k for k, _ in FINAL if any(f[k] is not None for f in finals)]
    heads = dict(FINAL)
    md = "## Final metrics\n\n" + markdown_table(
        ["run", *(heads[k] for k in shown)],
        [[n, *(f[k] for k in shown)] for n, f in zip(names, finals)])
    if diff:
        md += "\n## Config differences\n\n" + markdown_table(
            ["key", *names], [[k, *(json.dumps(x) for x in v)] for k, v in diff.items()])
    else:
        md += "\nThe runs have the same config (up to their names).\n"
    atomic_write(out / "compare.md", lambda f: f.write(md.encode()))
    from .figures_compare import plot_comparison

    fig = plot_comparison(out / "compare.png", runs, names)
    report["files"] = [str(out / "compare.json"), str(out / "compare.md"), str(fig)]
    return report
