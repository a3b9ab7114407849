"""Figures (PNG, matplotlib's Agg backend): token trajectories, losses, particles, NTK spectra,
and the figures of a training run. Application layer: the numerics never import this module.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path) -> Path:
    """Lay out, write `fig` as a PNG at `path` (creating its folder), and close it."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_trajectories(path, xs, w=None, s=None, *, max_sequences: int = 16,
                      max_tokens: int = 96, title: str = "", titles=None, targets=None,
                      dims=(0, 1), target_label: str = "target") -> Path:
    """Token trajectories in the plane of the coordinates `dims` (default the first two).

    `xs`: states `(T, B, n, d)` at depths `s` `(T,)`; one panel per sequence (at most
    `max_sequences`, in rows of four, at most `max_tokens` tokens each), titled by `titles[b]`
    (e.g. the sequence's family). Zero-weight tokens are drawn dashed and the last token, when
    it has weight 0 (a readout query), is marked with a star at s = 0 and s = 1. `targets`:
    what the outputs should reach, drawn in blue: `(B, d)` (one point per sequence: the query's
    target) or `(B, m, d)` (a target point cloud or one target per token).
    """
    plt = _pyplot()
    xs = np.asarray(xs)
    n_all = xs.shape[2]
    w_all = None if w is None else np.asarray(w)
    keep = list(range(min(n_all, max_tokens)))
    query = w_all is not None and bool(np.all(w_all[:, -1] == 0))
    if query and n_all - 1 not in keep:
        keep[-1] = n_all - 1  # always show the query
    xs = xs[:, :, keep]
    w = None if w_all is None else w_all[:, keep]
    T, B, n, d = xs.shape
    if d < 2:
        xs = np.concatenate([xs, np.zeros_like(xs)], axis=-1)
    i, j = dims
    nb = min(B, max_sequences)
    ncol = min(nb, 4)
    nrow = -(-nb // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.6 * ncol, 3.6 * nrow), squeeze=False)
    for b in range(nrow * ncol):
        ax = axes[b // ncol][b % ncol]
        if b >= nb:
            ax.axis("off")
            continue
        for k in range(n):
            pad = w is not None and w[b, k] == 0
            ax.plot(xs[:, b, k, i], xs[:, b, k, j], lw=0.8, alpha=0.7, ls="--" if pad else "-")
        ax.scatter(xs[0, b, :, i], xs[0, b, :, j], s=8, c="k", marker="o", label="s = 0", zorder=3)
        ax.scatter(xs[-1, b, :, i], xs[-1, b, :, j], s=12, c="C3", marker="x", label="s = 1",
                   zorder=3)
        if query:
            ax.scatter(xs[[0, -1], b, -1, i], xs[[0, -1], b, -1, j], s=120, marker="*",
                       facecolors=["k", "C3"], edgecolors="gold", linewidths=1.0, zorder=5,
                       label="query (s = 0, 1)")
        if targets is not None:
            t = np.asarray(targets)[b]
            t = t[None] if t.ndim == 1 else t
            ax.scatter(t[:, i], t[:, j], s=60 if len(t) == 1 else 10, c="C0",
                       marker="P" if len(t) == 1 else ".", alpha=0.9, zorder=6,
                       label=target_label)
        ax.set_title(titles[b] if titles is not None and b < len(titles) else f"sequence {b}",
                     fontsize=9)
        ax.set_xlabel(f"x[{i}]")
        ax.set_ylabel(f"x[{j if j >= 0 else d + j}]")
        ax.set_aspect("equal", adjustable="datalim")
    axes[0][0].legend(loc="best", fontsize=7)
    if title:
        fig.suptitle(title + (f" ({nb} of {B} sequences)" if nb < B else ""))
    return _save(plt, fig, path)


def plot_loss(path, steps, losses, *, eval_steps=None, test_accuracy=None, w2=None,
              title: str = "") -> Path:
    """Training loss against step on a log scale; beside it, the distance W_{2,c} travelled by the
    heads and (classification) the test accuracy at the evaluation steps."""
    plt = _pyplot()
    steps = np.asarray(steps)
    losses = np.asarray(losses, dtype=float)
    extra = eval_steps is not None and len(eval_steps) > 0
    fig, axes = plt.subplots(1, 2 if extra else 1, figsize=(10 if extra else 5.5, 4), squeeze=False)
    ax = axes[0][0]
    pos = losses > 0
    ax.semilogy(steps[pos], losses[pos], lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title("loss (log scale)")
    if extra:
        ax2 = axes[0][1]
        es = np.asarray(eval_steps)
        if w2 is not None:
            ax2.plot(es, np.asarray(w2, dtype=float), "o-", ms=3, color="C1",
                     label="W2,c(ν_t, ν_0)")
            ax2.set_ylabel("W2,c from the initial heads")
        ax2.set_xlabel("step")
        acc = [a for a in (test_accuracy or []) if a is not None]
        if acc:
            ax3 = ax2.twinx()
            ax3.plot(es[: len(acc)], acc, "s-", ms=3, color="C2", label="test accuracy")
            ax3.set_ylabel("test accuracy")
            ax3.set_ylim(0, 1)
            ax3.legend(loc="lower right", fontsize=8)
        ax2.legend(loc="upper left", fontsize=8)
        ax2.grid(True, alpha=0.3)
        ax2.set_title("distance travelled" + (" and test accuracy" if acc else ""))
    if title:
        fig.suptitle(title)
    return _save(plt, fig, path)


def plot_particles(path, theta0, theta1, *, title: str = "") -> Path:
    """Head particles of one layer at the start (`theta0`) and end (`theta1`) of training, each
    `(M, p)` (flattened θ), projected on the two leading principal axes of the pooled set; a
    segment joins every particle's start and end."""
    plt = _pyplot()
    a, b = np.asarray(theta0, float), np.asarray(theta1, float)
    pooled = np.concatenate([a, b])
    mean = pooled.mean(0)
    _, _, vt = np.linalg.svd(pooled - mean, full_matrices=False)
    basis = vt[:2].T if vt.shape[0] >= 2 else np.eye(pooled.shape[1], 2)
    pa, pb = (a - mean) @ basis, (b - mean) @ basis
    if pa.shape[1] < 2:
        pa, pb = np.pad(pa, ((0, 0), (0, 1))), np.pad(pb, ((0, 0), (0, 1)))
    fig, ax = plt.subplots(figsize=(5, 5))
    for m in range(pa.shape[0]):
        ax.plot([pa[m, 0], pb[m, 0]], [pa[m, 1], pb[m, 1]], color="0.6", lw=0.6)
    ax.scatter(pa[:, 0], pa[:, 1], s=14, c="k", label="start")
    ax.scatter(pb[:, 0], pb[:, 1], s=14, c="C3", marker="x", label="end")
    ax.set_xlabel("principal axis 1")
    ax.set_ylabel("principal axis 2")
    ax.legend(loc="best", fontsize=8)
    ax.set_title(title or "head particles")
    return _save(plt, fig, path)


def plot_spectra(report: dict, path, tests=("mod_affine", "mod_constants", "hessian", "ntk")) -> Path:
    """Normalised singular values of every test of an NTK certificate report, with their
    thresholds (log scale)."""
    plt = _pyplot()
    curves = [(name, report[name]) for name in tests]
    curves += [(f"ntk.{k}", v) for k, v in report["ntk"]["blocks"].items() if k != "A"]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    floor = np.finfo(float).eps / 10
    for j, (name, test) in enumerate(curves):
        s = np.asarray(test["singular_values"])
        rel = np.maximum(s / s[0] if s[0] > 0 else np.zeros_like(s), floor)
        line, = ax.semilogy(np.arange(1, len(s) + 1) + 0.06 * (j - len(curves) / 2), rel, "o-",
                            label=f"{name} ({'indep.' if test['independent'] else 'dependent'})")
        ax.axhline(test["threshold"], color=line.get_color(), ls=":", lw=0.8)
    ax.set_xlabel("singular value index")
    ax.set_ylabel("sigma_k / sigma_max")
    ax.set_title("LSE injectivity certificate (dotted: thresholds)")
    ax.legend(fontsize=7)
    return _save(plt, fig, path)


def write_run_figures(rd, run, heads) -> list[Path]:
    """The figures of a training run directory `rd` (see `figures_run.write_run_figures`)."""
    from .figures_run import write_run_figures as write

    return write(rd, run, heads)
