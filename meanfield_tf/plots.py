"""Figures (PNG, matplotlib's Agg backend): token trajectories, losses, particles, spectra.

Top layer: numerics never import this module.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_trajectories(path, xs, w=None, s=None, *, max_sequences: int = 4, max_tokens: int = 96,
                      title: str = "") -> Path:
    """Token trajectories in the plane of the first two coordinates.

    `xs`: states `(T, B, n, d)` at depths `s` `(T,)`; one panel per sequence (at most
    `max_sequences`, and at most `max_tokens` tokens each); zero-weight tokens (padding, readout queries) are drawn dashed.
    """
    plt = _pyplot()
    xs = np.asarray(xs)[:, :, :max_tokens]
    w = None if w is None else np.asarray(w)[:, :max_tokens]
    T, B, n, d = xs.shape
    if d < 2:
        xs = np.concatenate([xs, np.zeros_like(xs)], axis=-1)
    nb = min(B, max_sequences)
    fig, axes = plt.subplots(1, nb, figsize=(4 * nb, 4), squeeze=False)
    for b, ax in enumerate(axes[0]):
        for k in range(n):
            pad = w is not None and w[b, k] == 0
            ax.plot(xs[:, b, k, 0], xs[:, b, k, 1], lw=0.8, alpha=0.7, ls="--" if pad else "-")
        ax.scatter(xs[0, b, :, 0], xs[0, b, :, 1], s=8, c="k", marker="o", label="s = 0", zorder=3)
        ax.scatter(xs[-1, b, :, 0], xs[-1, b, :, 1], s=12, c="C3", marker="x", label="s = 1", zorder=3)
        ax.set_title(f"sequence {b}")
        ax.set_xlabel("x[0]")
        ax.set_ylabel("x[1]")
        ax.set_aspect("equal", adjustable="datalim")
    axes[0][0].legend(loc="best", fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
