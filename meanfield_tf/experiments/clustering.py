r"""`clustering`: pure self-attention on the sphere collapses the tokens to one point.

**Setup.** The dynamics of Geshkovski, Letrouit, Polyanskiy and Rigollet: $n = 64$ tokens drawn
uniformly on $S^2$ ($d = 3$; one independent sequence per seed, all in one batch), value
$V = I$, query–key $A = \beta I$, one head per layer (all heads equal), tokens kept on the sphere
(`DepthSolver(geometry=Sphere())`):
$$\dot x_i = P^\perp_{x_i} \sum_j \operatorname{softmax}_j(\beta \langle x_i, x_j\rangle)\, x_j,
\qquad t \in [0, T].$$

**Time ↔ depth.** The simulator integrates depth $s \in [0, 1]$; time is $t = T s$, obtained by
scaling the velocity by $T$: every cell's head is $V = T\,I$, $A = \beta I$. `cells` depth cells
of identical heads.

**Solvers.** The main run integrates the continuous model: Tsit5 with adaptive steps
(`rtol = atol`) on the tangent-projected field, saved at `num_saves` times spaced geometrically
in $[10^{-2}, T]$ (plus $t = 0$). A check runs the finite transformer — normalised Euler,
$x \leftarrow (x + h v)/|x + h v|$ with time step $h$ = `euler_step` — for the first $\beta$ up to
`euler_horizon`, and compares its collapse times with the continuous ones.

**Measured.** The diameter $D(t) = \max_{i,j} |x_i(t) - x_j(t)|$ (chordal); the collapse time,
the first $t$ with $D(t) <$ `threshold` (linear interpolation of $\log D$ between saves); the
number of clusters at $T$ (connected components of the graph $|x_i - x_j| <$ `cluster_link`).
A seed that has not collapsed by $T$ is censored: the row's mean collapse time is then `None`.

**Cost** (float64; wall clock on a 2-core CPU shared with other jobs, 2026-11-30,
`meanfield-tf experiment run clustering [--quick]`): `--quick` ≈ 30 s, full size ≈ 110 s, mostly
compilation (one for the continuous solve, shared by every β, one for the Euler check).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

import numpy as np

from .._errors import ConfigError
from ._common import float64, mean_and_stderr

NAME = "clustering"
CLAIM = ("Self-attention on the sphere (V = I, A = beta I) collapses the tokens to a single "
         "cluster; the collapse time grows with beta (metastable clusters)")


@dataclasses.dataclass(frozen=True)
class Config:
    seed: int = 0
    seeds: int = 10
    num_tokens: int = 64
    dim: int = 3
    betas: tuple[float, ...] = (1.0, 4.0, 9.0)
    horizon: float = 5000.0
    threshold: float = 1e-2
    cluster_link: float = 0.1
    rtol: float = 1e-8
    cells: int = 10
    max_steps_per_cell: int = 20_000
    num_saves: int = 1500
    euler_step: float = 0.05
    euler_horizon: float = 40.0

    def __post_init__(self):
        for name in ("seeds", "num_tokens", "cells", "max_steps_per_cell"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.dim < 2:
            raise ConfigError(f"dim must be >= 2 (the sphere S^(d-1)), got {self.dim}")
        if self.num_saves < 3:
            raise ConfigError(f"num_saves must be >= 3, got {self.num_saves}")
        if min(self.betas) <= 0:
            raise ConfigError(f"betas must be > 0, got {self.betas}")
        for name in ("horizon", "threshold", "cluster_link", "rtol", "euler_step",
                     "euler_horizon"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.horizon <= 1e-2:
            raise ConfigError(f"horizon must exceed the first save time 1e-2, got {self.horizon}")
        if self.euler_step > self.euler_horizon:
            raise ConfigError("euler_step must be <= euler_horizon")


QUICK = {"seeds": 3, "horizon": 1000.0, "num_saves": 300, "rtol": 1e-6, "euler_step": 0.1,
         "euler_horizon": 20.0, "max_steps_per_cell": 5000}


def times(cfg: Config) -> np.ndarray:
    """The save times: 0, then `num_saves - 1` times geometric in [1e-2, T]."""
    return np.concatenate([[0.0], np.geomspace(1e-2, cfg.horizon, cfg.num_saves - 1)])


def diameters(xs) -> np.ndarray:
    """`max_ij |x_i - x_j|` of states `(..., n, d)`, shape `(...)`."""
    xs = np.asarray(xs)
    gram = np.einsum("...id,...jd->...ij", xs, xs)
    sq = np.einsum("...ii->...i", gram)
    d2 = sq[..., :, None] + sq[..., None, :] - 2 * gram
    return np.sqrt(np.maximum(d2, 0).max(axis=(-1, -2)))


def collapse_time(t: np.ndarray, diam: np.ndarray, threshold: float) -> float:
    """First time `diam < threshold`, `log diam` interpolated linearly in `t` between the two
    saves around the crossing; `inf` if it never crosses."""
    below = np.nonzero(diam < threshold)[0]
    if below.size == 0:
        return float("inf")
    i = int(below[0])
    if i == 0:
        return float(t[0])
    la, lb, lt = np.log(diam[i - 1]), np.log(max(diam[i], 1e-300)), np.log(threshold)
    return float(t[i - 1] + (t[i] - t[i - 1]) * (la - lt) / (la - lb))


def num_clusters(x: np.ndarray, link: float) -> int:
    """Connected components of the graph `|x_i - x_j| < link` on the tokens `x` `(n, d)`."""
    adj = np.linalg.norm(x[:, None] - x[None], axis=-1) < link
    label = np.arange(x.shape[0])
    while True:  # propagate the smallest label along edges until nothing changes
        new = np.where(adj, label[None, :], x.shape[0]).min(axis=1)
        if np.array_equal(new, label):
            return int(np.unique(label).size)
        label = new


def run(cfg: Config, out: Path, progress: Callable[[str], None]) -> dict:
    with float64():
        return _run(cfg, Path(out), progress)


def _heads(beta: float, horizon: float, L: int, d: int):
    """`L` cells of one head `A = beta I`, `V = horizon I` (depth s ↔ time t = horizon s)."""
    import jax.numpy as jnp

    import meanfield_tf as mf

    eye = jnp.broadcast_to(jnp.eye(d, dtype=jnp.float64), (L, 1, d, d))
    return mf.HeadMeasure(A=beta * eye, V=horizon * eye)


def _tokens(cfg: Config):
    import jax

    import meanfield_tf as mf

    g = jax.random.normal(jax.random.PRNGKey(cfg.seed), (cfg.seeds, cfg.num_tokens, cfg.dim))
    return mf.TokenBatch(g / jax.numpy.linalg.norm(g, axis=-1, keepdims=True))


def _run(cfg: Config, out: Path, progress) -> dict:
    import diffrax
    import jax.numpy as jnp

    import meanfield_tf as mf

    from ._clustering_figures import figures

    tokens = _tokens(cfg)
    t = times(cfg)
    solver = mf.DepthSolver(diffrax.Tsit5(), mf.AdaptiveSteps(cfg.rtol, cfg.rtol,
                                                              cfg.max_steps_per_cell),
                            geometry=mf.Sphere())
    table, curves, snapshots, sphere_error = [], {}, {}, 0.0
    for beta in cfg.betas:
        sol = mf.flow(_heads(beta, cfg.horizon, cfg.cells, cfg.dim), tokens, solver,
                      depths=jnp.asarray(t / cfg.horizon)).check()
        xs = np.asarray(sol.xs)  # (T, seeds, n, d)
        sphere_error = max(sphere_error, float(np.abs(np.linalg.norm(xs, axis=-1) - 1).max()))
        diam = diameters(xs)  # (T, seeds)
        tc = np.array([collapse_time(t, diam[:, k], cfg.threshold) for k in range(cfg.seeds)])
        done = np.isfinite(tc)
        mean, se = mean_and_stderr(tc) if done.all() else (None, None)
        table.append({
            "beta": beta, "collapse_time": mean, "stderr": se,
            "final_diameter": float(diam[-1].mean()),
            "collapsed": int(done.sum()), "seeds": cfg.seeds,
            "collapse_times": [float(v) if np.isfinite(v) else None for v in tc],
            "clusters_at_horizon": float(np.mean([num_clusters(xs[-1, k], cfg.cluster_link)
                                                  for k in range(cfg.seeds)])),
            "steps": int(np.asarray(sol.num_steps).sum()),
        })
        curves[beta] = diam
        snapshots[beta] = xs[:, 0]
        r = table[-1]
        progress(f"beta={beta:g}: {r['collapsed']}/{cfg.seeds} collapsed by T={cfg.horizon:g}, "
                 f"collapse time {_fmt(mean, se)}, clusters at T {r['clusters_at_horizon']:.2f}, "
                 f"{r['steps']} Tsit5 steps")
    check = _euler_check(cfg, tokens, table[0], progress)
    results = {
        "table": table,
        "threshold": cfg.threshold,
        "horizon": cfg.horizon,
        "seeds": cfg.seeds,
        "num_tokens": cfg.num_tokens,
        "dim": cfg.dim,
        "time_mapping": "t = horizon * s: every depth cell has V = horizon * I, A = beta * I",
        "solver": f"Tsit5, adaptive (rtol = atol = {cfg.rtol:g}), tangent-projected field",
        "sphere_error": sphere_error,
        "euler_check": check,
        "curves": {"t": t.tolist(),
                   "median_diameter": {str(b): np.median(c, axis=1).tolist()
                                       for b, c in curves.items()}},
    }
    figures(results, curves, snapshots, t, out)
    return results


def _fmt(mean, se) -> str:
    return "censored (not all seeds collapsed)" if mean is None else f"{mean:.4g} ± {se:.2g}"


def _euler_check(cfg: Config, tokens, row: dict, progress) -> dict:
    """The finite transformer (normalised Euler, time step `euler_step`) for `betas[0]` up to
    `euler_horizon`: its collapse times against the continuous run's."""
    import meanfield_tf as mf

    L = max(1, int(round(cfg.euler_horizon / cfg.euler_step)))
    h = cfg.euler_horizon / L
    sol = mf.flow(_heads(row["beta"], cfg.euler_horizon, L, cfg.dim), tokens,
                  mf.DepthSolver(geometry=mf.Sphere()))
    xs = np.asarray(sol.xs)
    t = np.asarray(sol.s) * cfg.euler_horizon
    diam = diameters(xs)
    tc = np.array([collapse_time(t, diam[:, k], cfg.threshold) for k in range(cfg.seeds)])
    ref = np.array([np.inf if v is None else v for v in row["collapse_times"]])
    both = np.isfinite(tc) & np.isfinite(ref)
    signed = (tc[both] - ref[both]) / ref[both]
    rel = np.abs(signed)
    result = {
        "beta": row["beta"], "layers": L, "time_step": h, "horizon": cfg.euler_horizon,
        "collapse_times": [float(v) if np.isfinite(v) else None for v in tc],
        "compared": int(both.sum()),
        "max_rel_difference": float(rel.max()) if rel.size else None,
        "mean_rel_difference": float(rel.mean()) if rel.size else None,
        "mean_signed_rel_difference": float(signed.mean()) if rel.size else None,
        "sphere_error": float(np.abs(np.linalg.norm(xs, axis=-1) - 1).max()),
    }
    progress(f"finite transformer (normalised Euler, h={h:g}, L={L}) at beta={row['beta']:g}: "
             f"collapse times differ from the continuous ones by "
             f"{_pct(result['mean_rel_difference'])} on average over {result['compared']} seeds")
    return result


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.2g}%"


def rows(results: dict) -> list[dict]:
    return [{"beta": r["beta"], "collapse_time": r["collapse_time"], "stderr": r["stderr"],
             "collapsed": f"{r['collapsed']}/{r['seeds']}", "final_diameter": r["final_diameter"],
             "clusters_at_T": r["clusters_at_horizon"]} for r in results["table"]]


def discussion(results: dict) -> str:
    table, T, thr = results["table"], results["horizon"], results["threshold"]
    parts = []
    for r in table:
        if r["collapse_time"] is not None:
            parts.append(f"β = {r['beta']:g}: all {r['seeds']} seeds collapse, at t = "
                         f"{r['collapse_time']:.3g} ± {r['stderr']:.2g}")
        else:
            D = r["final_diameter"]
            parts.append(f"β = {r['beta']:g}: {r['collapsed']}/{r['seeds']} seeds collapse by "
                         f"T = {T:g}, {r['clusters_at_horizon']:.2g} clusters on average at T, "
                         f"diameter {D:.3g}; two clusters a distance D apart attract each other "
                         f"with the softmax weight factor exp(−βD²/2) ≈ "
                         f"{np.exp(-r['beta'] * D**2 / 2):.1g} relative to their own tokens, so "
                         f"their merging is slower by about that factor")
    e = results["euler_check"]
    medians = [np.median([np.inf if v is None else v for v in r["collapse_times"]])
               for r in table]
    grows = all(a < b or (a == b == np.inf) for a, b in zip(medians, medians[1:]))
    trend = ("the median collapse time grows steeply with β, as" if grows else
             "the median collapse time does NOT grow monotonically with β here, against what")
    return (
        f"{results['num_tokens']} tokens uniform on S^{results['dim'] - 1}, V = I, A = βI, time "
        f"t = T s (V = T·I in every depth cell). Collapse means a diameter below {thr:g}. "
        + "; ".join(parts) + ". "
        "Clusters form quickly and then merge slowly: the diameter curve shows plateaus near the "
        f"distance between surviving clusters, and {trend} the theory predicts (for d ≥ 3, "
        "convergence to a single cluster for almost every initial condition and every β, through "
        "metastable multi-cluster states whose lifetime grows rapidly with β). Once collapsed, "
        "the diameter stops decaying at the solver's error floor (about the tolerance), a "
        "numerical floor rather than part of the dynamics. A seed that has not collapsed by T is not a counterexample: its "
        "clusters are still merging, on a time scale beyond the horizon; the mean collapse time "
        "is reported only when every seed collapsed, so it is not biased by censoring. The "
        f"finite transformer (normalised Euler, time step {e['time_step']:g}) at β = "
        f"{e['beta']:g} collapses at times within {_pct(e['mean_rel_difference'])} on average "
        f"(at most {_pct(e['max_rel_difference'])}; mean signed difference "
        f"{_pct(e['mean_signed_rel_difference'])}) of the continuous ones; tokens stay on the "
        f"sphere to {e['sphere_error']:.1g} (Euler, normalised) and "
        f"{results['sphere_error']:.1g} (Tsit5, tangent field)."
    )
