r"""`adjoint`: the explicit gradient formula (adjoint with its non-local term) is the gradient.

**Setup** (float64; `seeds` random problems): $B = 2$ sequences of $n = 6$ tokens in $d = 2$,
$L = 4$ layers of $M = 4$ heads from `gaussian_heads` (scales 2, so that the solver tolerance shows), token-regression risk
$R = \frac1B\sum_i \sum_k w_{ik}\frac12|X^i_{1,k} - y_{ik}|^2$ with random targets.

**Reference.** The continuous-depth model solved by RK4 with `ref_steps` = 256 steps per layer;
its directional derivatives $\partial R/\partial\theta\cdot\delta_j$ along `directions` random unit
directions $\delta_j$ by the fourth-order central difference
$[8(R(\theta{+}h\delta){-}R(\theta{-}h\delta)) - (R(\theta{+}2h\delta){-}R(\theta{-}2h\delta))]/(12h)$,
$h$ = `fd_step`. Both of its errors are reported (`reference_check`): the change when $h$ is
halved, and the change when the RK4 steps are halved.

**Methods** (Tsit5 with adaptive steps, rtol = atol $\in \{10^{-4}, 10^{-6}, 10^{-8}, 10^{-10}\}$):
`autodiff` (differentiate the numerical solve), `backsolve` (diffrax's continuous adjoint) and
`explicit` (the closed-form adjoint dynamics with local and non-local terms, and the closed-form
gradient field). Each returns the mean-field gradient $g = LM\,\partial R/\partial\theta$, so its
directional derivatives are $\langle g, \delta_j\rangle / (LM)$; `rel_error` is
$\|D_{\text{method}} - D_{\text{ref}}\| / \|D_{\text{ref}}\|$ over the directions, mean over seeds.
`ablation_rel_error`: the explicit method without the non-local term, at the tightest rtol.

**Gradient field.** $\nabla_\theta G(s, \theta)$ at depth $s = l/L$ (`slice_layer`), from
`explicit_adjoint` (states and adjoints at $s$) and `gradient_field` on a grid of
$(A_{11}, A_{22})$ around head `slice_head` (its other entries fixed; the window covers
`slice_width` around it and every particle of the layer; a slice in $V$ would show
a constant field, since $a_\theta$ is linear in $V$); the figure draws
$-\nabla_\theta G$ (the direction particles move in training) with the layer's particles
projected on the slice.

**Cost** (float64; wall clock on a 2-core CPU shared with about six other jobs, 2026-11-30,
`python -m meanfield_tf experiment run adjoint [--quick]`): `--quick` ≈ 6 min (50 s of CPU
time), full size ≈ 16 min (5 problems, 4 tolerances); mostly compilation of the three methods
and the vectorised finite differences, then ~90 s per random problem.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

import numpy as np

from .._errors import ConfigError
from ._common import float64, mean_and_stderr, new_figure, save_figure

NAME = "adjoint"
CLAIM = ("The explicit gradient formula: the adjoint with its non-local term gives the exact "
         "gradient; dropping the non-local term does not")

METHODS = ("autodiff", "backsolve", "explicit")


@dataclasses.dataclass(frozen=True)
class Config:
    seed: int = 0
    seeds: int = 5
    batch: int = 2
    num_tokens: int = 6
    dim: int = 2
    layers: int = 4
    heads: int = 4
    scale_A: float = 2.0
    scale_V: float = 2.0
    rtols: tuple[float, ...] = (1e-4, 1e-6, 1e-8, 1e-10)
    ref_steps: int = 256
    fd_step: float = 1e-3
    directions: int = 8
    slice_layer: int = 2
    slice_head: int = 0
    slice_width: float = 1.5
    grid: int = 17

    def __post_init__(self):
        for name in ("seeds", "batch", "num_tokens", "dim", "layers", "heads", "ref_steps",
                     "directions", "grid"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.slice_layer < self.layers:
            raise ConfigError(f"slice_layer must lie in [0, {self.layers}), got {self.slice_layer}")
        if not 0 <= self.slice_head < self.heads:
            raise ConfigError(f"slice_head must lie in [0, {self.heads}), got {self.slice_head}")
        if min(self.rtols) <= 0 or self.fd_step <= 0:
            raise ConfigError("rtols and fd_step must be > 0")


QUICK = {"seeds": 2, "rtols": (1e-4, 1e-6, 1e-8), "directions": 4, "grid": 11}


def _solve_kwargs(cfg: Config, rtol: float | None) -> dict:
    """`rtol=None`: the reference (RK4, `ref_steps` fixed steps per layer); otherwise Tsit5 with
    adaptive steps at rtol = atol = `rtol`."""
    import diffrax

    import meanfield_tf as mf

    if rtol is None:
        return {"solver": mf.DepthSolver(mf.ClassicalRK4(), mf.FixedSteps(cfg.ref_steps),
                                         mf.DenseKernel())}
    return {"solver": mf.DepthSolver(diffrax.Tsit5(), mf.AdaptiveSteps(rtol, rtol),
                                     mf.DenseKernel())}


def _problem(key, cfg: Config):
    import jax
    import jax.numpy as jnp

    import meanfield_tf as mf

    kh, kx, ky = jax.random.split(key, 3)
    heads = mf.gaussian_heads(kh, cfg.layers, cfg.heads, cfg.dim, scale_A=cfg.scale_A,
                              scale_V=cfg.scale_V, dtype=jnp.float64)
    x = jax.random.normal(kx, (cfg.batch, cfg.num_tokens, cfg.dim), jnp.float64)
    y = jax.random.normal(ky, (cfg.batch, cfg.num_tokens, cfg.dim), jnp.float64)
    return heads, mf.TokenBatch(x), mf.TokenRegression(y)


def _fd_directional(heads, tokens, risk, directions, h, steps_cfg):
    """Fourth-order central differences of R along each direction (a dict of arrays with a
    leading direction axis), all perturbed solves in one vmapped call."""
    import jax
    import jax.numpy as jnp

    import meanfield_tf as mf

    kw = _solve_kwargs(steps_cfg, None)

    def R(params):
        hm = mf.HeadMeasure(**params, check=False)
        x1 = mf.flow(hm, tokens, **kw).x
        return risk(x1, tokens.w)

    coeffs = jnp.array([-2.0, -1.0, 1.0, 2.0])
    weights = jnp.array([1.0, -8.0, 8.0, -1.0]) / (12.0 * h)

    def along(delta):
        def at(c):
            return R(jax.tree.map(lambda p, dd: p + c * h * dd, heads.params, delta))

        return jnp.dot(weights, jax.vmap(at)(coeffs))

    return np.asarray(jax.jit(jax.vmap(along))(directions))


def run(cfg: Config, out: Path, progress: Callable[[str], None]) -> dict:
    with float64():
        return _run(cfg, Path(out), progress)


def _run(cfg: Config, out: Path, progress) -> dict:
    import jax
    import jax.numpy as jnp

    import meanfield_tf as mf

    LM = cfg.layers * cfg.heads
    errors = {(m, r): [] for m in METHODS for r in cfg.rtols}
    ablation = []
    fd_h_change, fd_steps_change = [], []
    key = jax.random.PRNGKey(cfg.seed)
    for seed in range(cfg.seeds):
        kp, kd = jax.random.split(jax.random.fold_in(key, seed))
        heads, tokens, risk = _problem(kp, cfg)
        # random unit directions in parameter space, leading axis = direction
        leaves, tree = jax.tree.flatten(heads.params)
        raw = [jax.random.normal(k, (cfg.directions,) + p.shape, jnp.float64)
               for k, p in zip(jax.random.split(kd, len(leaves)), leaves)]
        norm = jnp.sqrt(sum(jnp.sum(r.reshape(cfg.directions, -1) ** 2, axis=1) for r in raw))
        dirs = jax.tree.unflatten(tree, [r / norm.reshape((-1,) + (1,) * (r.ndim - 1))
                                         for r in raw])
        ref = _fd_directional(heads, tokens, risk, dirs, cfg.fd_step, cfg)
        ref_h = _fd_directional(heads, tokens, risk, dirs, cfg.fd_step / 2, cfg)
        half = dataclasses.replace(cfg, ref_steps=max(1, cfg.ref_steps // 2))
        ref_s = _fd_directional(heads, tokens, risk, dirs, cfg.fd_step, half)
        scale = np.linalg.norm(ref)
        fd_h_change.append(np.linalg.norm(ref_h - ref) / scale)
        fd_steps_change.append(np.linalg.norm(ref_s - ref) / scale)

        def rel(grads) -> float:
            d = np.asarray(sum(
                jnp.sum((g[None] * dd).reshape(cfg.directions, -1), axis=1)
                for g, dd in zip(jax.tree.leaves(grads.params), jax.tree.leaves(dirs))
            )) / LM
            return float(np.linalg.norm(d - ref) / scale)

        for rtol in cfg.rtols:
            kw = _solve_kwargs(cfg, rtol)
            for name, method in (("autodiff", mf.Autodiff()), ("backsolve", mf.Backsolve()),
                                 ("explicit", mf.Explicit())):
                _, g = mf.risk_and_gradient(heads, tokens, risk, method=method, **kw)
                errors[(name, rtol)].append(rel(g))
        _, g = mf.risk_and_gradient(heads, tokens, risk, method=mf.Explicit(nonlocal_term=False),
                                    **_solve_kwargs(cfg, min(cfg.rtols)))
        ablation.append(rel(g))
        progress(f"problem {seed + 1}/{cfg.seeds}: explicit at rtol {min(cfg.rtols):g}: "
                 f"{errors[('explicit', min(cfg.rtols))][-1]:.2g}; without the non-local term: "
                 f"{ablation[-1]:.2g}; FD step/steps changes {fd_h_change[-1]:.1g}/"
                 f"{fd_steps_change[-1]:.1g}")

    table = []
    for m in METHODS:
        for r in cfg.rtols:
            mu, se = mean_and_stderr(errors[(m, r)])
            table.append({"method": m, "rtol": r, "rel_error": float(mu),
                          "rel_error_stderr": float(se)})
    ab_mu, ab_se = mean_and_stderr(ablation)
    results = {
        "table": table,
        "ablation_rel_error": float(ab_mu),
        "ablation_rel_error_stderr": float(ab_se),
        "ablation_rtol": min(cfg.rtols),
        "reference_check": {
            "method": f"4th-order central differences (h={cfg.fd_step}) along "
                      f"{cfg.directions} random unit directions of RK4 with {cfg.ref_steps} "
                      f"steps per layer, float64",
            "fd_step_halved_change": float(np.max(fd_h_change)),
            "rk4_steps_halved_change": float(np.max(fd_steps_change)),
        },
        "seeds": cfg.seeds,
    }
    results["gradient_field"] = _gradient_field(cfg, out, progress)
    _figure_errors(results, out)
    return results


def _gradient_field(cfg: Config, out: Path, progress) -> dict:
    """∇θG on an (A11, A22) grid around one head at depth s = slice_layer / L; draws the figure."""
    import jax
    import jax.numpy as jnp

    import meanfield_tf as mf

    heads, tokens, risk = _problem(jax.random.fold_in(jax.random.PRNGKey(cfg.seed), 0), cfg)
    sol = mf.explicit_adjoint(heads, tokens, risk, **_solve_kwargs(cfg, min(cfg.rtols)))
    l, m = cfg.slice_layer, cfg.slice_head
    A0, V0 = heads.A[l, m], heads.V[l, m]
    pa = np.asarray(heads.A[l])  # the layer's particles, to be drawn on the slice
    w = cfg.slice_width
    lo1 = min(float(A0[0, 0]) - w, pa[:, 0, 0].min() - 0.2)
    hi1 = max(float(A0[0, 0]) + w, pa[:, 0, 0].max() + 0.2)
    lo2 = min(float(A0[1, 1]) - w, pa[:, 1, 1].min() - 0.2)
    hi2 = max(float(A0[1, 1]) + w, pa[:, 1, 1].max() + 0.2)
    g1, g2 = np.meshgrid(np.linspace(lo1, hi1, cfg.grid), np.linspace(lo2, hi2, cfg.grid))
    G = g1.size
    A = jnp.broadcast_to(A0, (G,) + A0.shape)
    A = A.at[:, 0, 0].set(jnp.asarray(g1.ravel())).at[:, 1, 1].set(jnp.asarray(g2.ravel()))
    V = jnp.broadcast_to(V0, (G,) + V0.shape)
    grad = mf.gradient_field(sol.states[l], tokens.w, sol.adjoints[l], {"A": A, "V": V})
    d1 = -np.asarray(grad["A"][:, 0, 0]).reshape(g1.shape)
    d2 = -np.asarray(grad["A"][:, 1, 1]).reshape(g1.shape)
    progress(f"gradient field on a {cfg.grid}x{cfg.grid} slice at s = {l}/{cfg.layers}")

    fig, ax = new_figure(6.0, 4.6)
    speed = np.hypot(d1, d2)
    ax.streamplot(g1, g2, d1, d2, color=speed, cmap="viridis", density=1.0, linewidth=0.8)
    ax.quiver(g1, g2, d1, d2, speed, cmap="viridis", alpha=0.6)
    pv = pa
    ax.scatter(pv[:, 0, 0], pv[:, 1, 1], c="k", s=18, label=f"heads of layer {l} (projected)")
    ax.scatter([pv[m, 0, 0]], [pv[m, 1, 1]], facecolors="none", edgecolors="r", s=120,
               label=f"head {m} (slice centre)")
    ax.set_xlim(g1.min(), g1.max())
    ax.set_ylim(g2.min(), g2.max())
    ax.set_xlabel("A₁₁ of the head (other entries fixed)")
    ax.set_ylabel("A₂₂")
    ax.set_title(f"−∇θG(s={l}/{cfg.layers}, θ): explicit gradient field")
    ax.legend(fontsize=8, loc="upper right")
    save_figure(fig, out, "gradient_field.png")
    return {"layer": l, "head": m, "coordinates": ["A[0,0]", "A[1,1]"],
            "max_speed": float(speed.max()), "min_speed": float(speed.min())}


def _figure_errors(results: dict, out: Path) -> None:
    fig, ax = new_figure()
    markers = {"autodiff": "o", "backsolve": "s", "explicit": "^"}
    for i, m in enumerate(METHODS):
        rs = [r for r in results["table"] if r["method"] == m]
        ax.errorbar([r["rtol"] for r in rs], [r["rel_error"] for r in rs],
                    yerr=[r["rel_error_stderr"] for r in rs], marker=markers[m], capsize=3,
                    color=f"C{i}", label=m)
    ax.axhline(results["ablation_rel_error"], color="C3", ls="--",
               label="explicit without non-local term")
    ax.axhline(results["reference_check"]["rk4_steps_halved_change"], color="gray", ls=":",
               label="reference error estimate")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("solver tolerance rtol = atol (Tsit5, adaptive)")
    ax.set_ylabel("relative gradient error vs finite differences")
    ax.set_title("Explicit adjoint formula: gradient error vs tolerance")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    save_figure(fig, out, "rel_error_vs_rtol.png")


def rows(results: dict) -> list[dict]:
    out = [{"method": r["method"], "rtol": r["rtol"], "rel_error": r["rel_error"]}
           for r in results["table"]]
    out.append({"method": "explicit, no non-local term", "rtol": results["ablation_rtol"],
                "rel_error": results["ablation_rel_error"]})
    return out


def discussion(results: dict) -> str:
    tight = min(r["rtol"] for r in results["table"])
    at = {r["method"]: r["rel_error"] for r in results["table"] if r["rtol"] == tight}
    loose = max(r["rtol"] for r in results["table"])
    at_loose = {r["method"]: r["rel_error"] for r in results["table"] if r["rtol"] == loose}
    c = results["reference_check"]
    return (
        f"Against finite differences of a fine RK4 solve ({c['method']}; halving the FD step "
        f"changes the reference by {c['fd_step_halved_change']:.1g} and halving the RK4 steps "
        f"by {c['rk4_steps_halved_change']:.1g}, relative), the three gradient methods converge "
        f"as the tolerance tightens: at rtol = {loose:g} the relative errors are "
        f"autodiff {at_loose['autodiff']:.2g}, backsolve {at_loose['backsolve']:.2g}, explicit "
        f"{at_loose['explicit']:.2g}; at rtol = {tight:g} they are {at['autodiff']:.2g}, "
        f"{at['backsolve']:.2g} and {at['explicit']:.2g} (mean over {results['seeds']} random "
        f"problems). The explicit formula, i.e. the adjoint dynamics with the local term "
        f"D_x v^T p and the non-local key/value term, is the gradient. Dropping the non-local "
        f"term leaves a relative error of {results['ablation_rel_error']:.2g} that no tolerance "
        f"removes: every token is a key and a value for every query, and that dependence "
        f"carries a large share of the gradient. The second figure shows the gradient field "
        f"−∇θG(s, θ) over a slice of one head's parameters, evaluated by the closed form away "
        f"from the particles as well as at them."
    )
