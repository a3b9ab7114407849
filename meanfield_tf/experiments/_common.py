"""Helpers shared by the experiment modules: float64 switch, log-log fits, figure saving."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np


@contextlib.contextmanager
def float64():
    """Enable `jax_enable_x64` inside the block, restoring the previous setting after it."""
    import jax

    before = bool(jax.config.jax_enable_x64)
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", before)


def mean_and_stderr(samples, axis=0) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard error of the mean (`std(ddof=1)/sqrt(k)`; 0 for a single sample)."""
    a = np.asarray(samples, dtype=float)
    k = a.shape[axis]
    mean = a.mean(axis=axis)
    se = a.std(axis=axis, ddof=1) / np.sqrt(k) if k > 1 else np.zeros_like(mean)
    return mean, se


def loglog_fit(x, y, y_stderr=None) -> dict:
    r"""Fit $\log y = \log C + p \log x$ by weighted least squares.

    Weights are $1/\sigma_{\log}^2$ with $\sigma_{\log} = $ `y_stderr / y` (the delta-method
    standard error of $\log y$); without error bars, ordinary least squares. The slope's standard
    error is the larger of the one implied by the error bars and the one from the residual
    scatter (so a poor fit is never reported as precise).

    **Returns:** `{"slope", "slope_stderr", "constant"}` (`constant` = C).
    """
    lx = np.log(np.asarray(x, dtype=float))
    ly = np.log(np.asarray(y, dtype=float))
    k = lx.size
    if y_stderr is None or not np.all(np.asarray(y_stderr) > 0):
        wts = np.ones(k)
    else:
        wts = 1.0 / (np.asarray(y_stderr, dtype=float) / np.asarray(y, dtype=float)) ** 2
    X = np.stack([np.ones(k), lx], axis=1)
    W = np.diag(wts)
    cov = np.linalg.inv(X.T @ W @ X)
    beta = cov @ X.T @ W @ ly
    resid = ly - X @ beta
    se_bars = np.sqrt(cov[1, 1]) if y_stderr is not None else 0.0
    if k > 2:
        scale = float(resid @ W @ resid) / (k - 2)
        se_scatter = np.sqrt(cov[1, 1] * scale)
    else:
        se_scatter = 0.0
    return {"slope": float(beta[1]), "slope_stderr": float(max(se_bars, se_scatter)),
            "constant": float(np.exp(beta[0]))}


def new_figure(width: float = 6.0, height: float = 4.0):
    """A matplotlib (Agg) figure and axes of the experiments' standard size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, height))


def save_figure(fig, out: Path, name: str) -> Path:
    """Save `fig` as `out / "figures" / name` (PNG, dpi 110) and close it."""
    import matplotlib.pyplot as plt

    path = Path(out) / "figures" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
