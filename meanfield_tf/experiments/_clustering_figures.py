"""Figures of the `clustering` experiment: tokens on the sphere, diameter vs time, collapse
time vs β."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ._common import new_figure, save_figure


def figures(results: dict, curves: dict, snapshots: dict, t: np.ndarray, out: Path) -> None:
    """Write `sphere_trajectories.png`, `diameter_vs_time.png` and `collapse_time_vs_beta.png`.

    `curves[beta]`: diameters `(T, seeds)`; `snapshots[beta]`: the first seed's states
    `(T, n, d)` at the save times `t` `(T,)`.
    """
    _trajectories(snapshots, t, out)
    _diameters(results, curves, t, out)
    _collapse(results, out)


def _snapshot_indices(t: np.ndarray) -> list[int]:
    """Save indices nearest to t = 0, 1, 10, 100, ... (below the horizon) and the horizon."""
    marks = [0.0] + [10.0**k for k in range(0, 9) if 10.0**k < 0.5 * t[-1]] + [t[-1]]
    return sorted({int(np.argmin(np.abs(t - m))) for m in marks})


def _trajectories(snapshots: dict, t: np.ndarray, out: Path) -> None:
    import matplotlib.pyplot as plt

    betas = list(snapshots)
    fig = plt.figure(figsize=(4.2 * len(betas), 4.4))
    idx = _snapshot_indices(t)
    colors = plt.cm.viridis(np.linspace(0, 1, len(idx)))
    u, v = np.mgrid[0:2 * np.pi:24j, 0:np.pi:12j]
    for p, beta in enumerate(betas):
        xs = snapshots[beta]
        ax = fig.add_subplot(1, len(betas), p + 1, projection="3d")
        ax.plot_wireframe(np.cos(u) * np.sin(v), np.sin(u) * np.sin(v), np.cos(v),
                          color="0.85", linewidth=0.4)
        for k in range(xs.shape[1]):
            ax.plot(xs[:, k, 0], xs[:, k, 1], xs[:, k, 2], color="0.5", linewidth=0.4)
        for j, (c, i) in enumerate(zip(colors, idx)):  # later times: larger, outlined markers
            ax.scatter(xs[i, :, 0], xs[i, :, 1], xs[i, :, 2], color=c, s=10 + 12 * j,
                       edgecolors="k" if j else "none", linewidths=0.4,
                       label=f"t = {t[i]:.3g}", depthshade=False)
        ax.set_box_aspect((1, 1, 1))
        ax.set_xlim(-1, 1)
        ax.set_ylim(-1, 1)
        ax.set_zlim(-1, 1)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_zticks([])
        ax.set_title(f"β = {beta:g} (seed 0)")
        if p == len(betas) - 1:
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(0.85, 1.0))
    fig.suptitle("Tokens on S² under self-attention (V = I, A = βI): trajectories and positions")
    save_figure(fig, out, "sphere_trajectories.png")


def _diameters(results: dict, curves: dict, t: np.ndarray, out: Path) -> None:
    fig, ax = new_figure(6.4, 4.2)
    for i, (beta, diam) in enumerate(curves.items()):
        color = f"C{i}"
        for k in range(diam.shape[1]):
            ax.plot(t[1:], diam[1:, k], color=color, alpha=0.25, linewidth=0.7)
        ax.plot(t[1:], np.median(diam[1:], axis=1), color=color, linewidth=2,
                label=f"β = {beta:g} (median; thin: seeds)")
    ax.axhline(results["threshold"], color="k", linestyle=":", label="collapse threshold")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("time t (= T · depth s)")
    ax.set_ylabel("diameter max |x_i − x_j|")
    ax.set_title("Largest pairwise distance vs time")
    ax.legend(fontsize=8, loc="lower left")
    ax.grid(True, which="both", alpha=0.3)
    save_figure(fig, out, "diameter_vs_time.png")


def _collapse(results: dict, out: Path) -> None:
    fig, ax = new_figure(5.4, 4.0)
    T = results["horizon"]
    labelled = set()
    for r in results["table"]:
        done = [v for v in r["collapse_times"] if v is not None]
        ax.scatter([r["beta"]] * len(done), done, color="0.6", s=10, zorder=2,
                   label=None if "seed" in labelled else "one seed")
        labelled.add("seed")
        censored = r["seeds"] - len(done)
        if r["collapse_time"] is not None:
            ax.errorbar([r["beta"]], [r["collapse_time"]], yerr=[r["stderr"]], fmt="o",
                        color="C0", capsize=4, zorder=3,
                        label=None if "mean" in labelled else "mean ± stderr")
            labelled.add("mean")
        if censored:
            ax.scatter([r["beta"]], [T], marker="^", color="C3", s=50, zorder=3,
                       label=None if "cens" in labelled else "not collapsed by T (count)")
            ax.annotate(f"{censored}/{r['seeds']}", (r["beta"], T), textcoords="offset points",
                        xytext=(6, -4), fontsize=8, color="C3")
            labelled.add("cens")
    ax.axhline(T, color="C3", linestyle=":", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("β (A = βI)")
    ax.set_ylabel(f"collapse time (diameter < {results['threshold']:g})")
    ax.set_title("Collapse time vs β")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(True, which="both", alpha=0.3)
    save_figure(fig, out, "collapse_time_vs_beta.png")
