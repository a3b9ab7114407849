"""Figures of several runs (PNG): the overlay of `meanfield-tf compare`, and the aggregate of a
sweep with error bars across seeds. matplotlib is imported on first use (see `figures.py`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .figures import _pyplot, _save


def _w2_curve(r):
    """`(steps, W2,c)` of a run: its eval rows and its frequent `w2` rows, merged by step."""
    points = {}
    for cols in (r.eval, r.w2):
        if len(cols.get("w2", [])):
            points.update(zip(cols["step"].tolist(), cols["w2"].tolist()))
    steps = np.array(sorted(points), dtype=float)
    return steps, np.array([points[k] for k in sorted(points)], dtype=float)


def plot_comparison(path, runs, names) -> Path:
    """Three panels: training loss against τ = Σ lr, against the step (test loss dashed), and
    W2,c of the heads from their start against the step; one colour per run."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for i, (r, name) in enumerate(zip(runs, names)):
        c = f"C{i % 10}"
        tr, ev = r.train, r.eval
        if len(tr.get("loss", [])):
            pos = tr["loss"] > 0
            axes[0].semilogy(tr["time"][pos], tr["loss"][pos], color=c, lw=1.2, label=name)
            axes[1].semilogy(tr["step"][pos], tr["loss"][pos], color=c, lw=1.2, label=name)
        if len(ev.get("test_loss", [])) and np.isfinite(ev["test_loss"]).any():
            axes[1].semilogy(ev["step"], ev["test_loss"], "--o", color=c, ms=3, lw=1,
                             label=f"{name} (test)")
        s, w2 = _w2_curve(r)
        axes[2].plot(s, w2, "-", color=c, lw=1.2, marker="." if len(s) < 40 else None,
                     label=name)
    axes[0].set_xlabel("training time τ = Σ lr")
    axes[1].set_xlabel("step")
    axes[2].set_xlabel("step")
    for ax in axes[:2]:
        ax.set_ylabel("loss (log scale)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_title("training loss against training time")
    axes[1].set_title("training loss (solid) and test loss (dashed)")
    axes[2].set_ylabel("W2,c(ν_t, ν_0)")
    axes[2].set_title("distance travelled by the heads")
    axes[2].grid(True, alpha=0.3)
    for ax in axes:
        ax.legend(fontsize=7, loc="best")
    return _save(plt, fig, path)


def plot_sweep(path, points: list[dict], metrics: list[str]) -> Path:
    """The aggregate of a sweep: for each metric, its mean ± standard error across seeds against
    the first swept key (one line per value of the other keys); beside them, the mean training
    loss curve of every grid point against the step with a ±1 standard error band.

    `points`: one dict per grid point with `"values"` (`{key: value}`), `"label"`,
    `"<metric>_mean"`, `"<metric>_sem"` and `"curve"` (`(steps, mean, sem)` or `None`)."""
    plt = _pyplot()
    keys = list(points[0]["values"]) if points else []
    first = keys[0] if keys else None
    fig, axes = plt.subplots(1, len(metrics) + 1, figsize=(5 * (len(metrics) + 1), 4.2),
                             squeeze=False)
    axes = axes[0]
    groups: dict[str, list[dict]] = {}
    for p in points:
        rest = ", ".join(f"{k}={v}" for k, v in p["values"].items() if k != first)
        groups.setdefault(rest, []).append(p)
    numeric = all(isinstance(p["values"].get(first), (int, float)) for p in points)
    for ax, m in zip(axes, metrics):
        for j, (rest, ps) in enumerate(groups.items()):
            xs = [p["values"][first] for p in ps] if numeric else list(range(len(ps)))
            ax.errorbar(xs, [p[f"{m}_mean"] for p in ps],
                        yerr=[0.0 if not np.isfinite(p[f"{m}_sem"]) else p[f"{m}_sem"]
                              for p in ps],
                        fmt="o-", capsize=4, color=f"C{j % 10}", label=rest or None)
            if not numeric:
                ax.set_xticks(xs, [str(p["values"][first]) for p in ps])
        ax.set_xlabel(first or "grid point")
        ax.set_ylabel(f"final {m} (mean ± s.e. over seeds)")
        if m.endswith("loss") and all(p[f"{m}_mean"] > 0 for p in points):
            ax.set_yscale("log")
        if numeric and all(p["values"][first] > 0 for p in points) and len(points) > 2:
            span = max(p["values"][first] for p in points) / min(p["values"][first] for p in points)
            if span >= 20:
                ax.set_xscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.set_title(f"final {m}")
        if any(groups):
            ax.legend(fontsize=7)
    ax = axes[-1]
    for j, p in enumerate(points):
        if p.get("curve") is None:
            continue
        steps, mean, sem = (np.asarray(a, float) for a in p["curve"])
        c = f"C{j % 10}"
        ax.semilogy(steps, mean, color=c, lw=1.2, label=p["label"])
        lo = np.where(mean - sem > 0, mean - sem, mean)
        ax.fill_between(steps, lo, mean + np.nan_to_num(sem), color=c, alpha=0.2)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (mean ± s.e. over seeds)")
    ax.set_title("training loss per grid point")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    return _save(plt, fig, path)
