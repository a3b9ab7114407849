r"""`convergence`: global convergence of the mean-field gradient flow from a small initial loss.

**Claim.** If the readout-query NTK $K$ at the initialisation $\nu_0$ is injective (the LSE
criterion holds for the training sequences), the gradient flow started close enough to a
minimiser drives the risk to zero exponentially, with asymptotic rate $2\lambda_{\min}(K)/N$, while
the heads stay within $W_{2,c}$ distance $O(\sqrt{R_0/\lambda_{\min}})$ of $\nu_0$.

**Set-up.** $N$ sequences of $n$ tokens $\sim N(0, \text{spread}^2 I_2)$ (they must pass the
certificate modulo constants: `certificate` in the results), a readout query $e$; risk
$R = \frac1N\sum_i \frac12|Y_i - Y_i^*|^2$; student $\nu_0$ = `symmetric_heads` ($L = 8$, $M = 64$,
zero velocity, so $Y(\nu_0) = e$); teacher $\nu^* = \nu_0 + \varepsilon\xi$ (`perturbed_heads`, $\xi$
i.i.d. Gaussian particles), targets $Y^* = Y(\nu^*)$ (`TeacherStudent`), $\varepsilon \in \{0.01,
0.1, 1\}$. Plain gradient descent on $g = LM\,\partial R/\partial\theta$ with step
$\tau = $ `step_fraction` $\cdot N/\lambda_{\max}(K_0)$ for a training time
$T = $ `horizon` $\cdot N/\lambda_{\min}(K_0)$.

**The predicted slope.** `mf.ntk_blocks` gives $K = LM\sum_{lm}\partial_{\theta_{lm}}Y\,
\partial_{\theta_{lm}}Y^\top$ (mean-field units). With $d\theta_{lm}/dt = -g_{lm} =
-LM\,\partial_{\theta_{lm}}R$: $dY/dt = -K\nabla_Y R$, and $\nabla_Y R = r/N$ ($r = Y - Y^*$), so
$dr/dt = -Kr/N$. In the linearised (lazy) regime $r(t) = e^{-Kt/N}r_0$ and
$R = |r|^2/(2N)$ decays like $e^{-2\lambda_{\min}t/N}$ once the slowest mode dominates: the slope
of $\log R$ against $t$ is $-2\lambda_{\min}(K)/N$. (Check with one mode: $K = \lambda$, $N = 1$,
$r = e^{-\lambda t}r_0$, $R = \frac12 r^2 \propto e^{-2\lambda t}$.) Explicit Euler multiplies the
mode by $(1 - \tau\lambda/N)$ per step, i.e. rate $-\log(1-\tau\lambda/N)/\tau$, within
$\tau\lambda_{\min}/(2N)$ relative of $\lambda/N$: at `step_fraction` 0.5 and condition numbers
$\gtrsim 30$ below 1%.

**The distance bound.** $dR/dt = -\|g\|^2_{L^2(\nu)}$ and
$\|g\|^2 = \nabla_Y R^\top K \nabla_Y R \ge \lambda_{\min}|r|^2/N^2 = 2\lambda_{\min}R/N$; with the
identity coupling of particles $W_{2,c}(\nu_t,\nu_0) \le \int_0^t\|g\|\,ds \le
\int_0^{R_0} dR/\sqrt{2\lambda R/N} = \sqrt{2NR_0/\lambda}$, valid while $\lambda_{\min}(K_{\nu_s})
\ge \lambda$: reported as `w2c_bound` with $\lambda = \lambda_{\min}(K_0)$, together with the
measured path length $\sum_k\tau\|g_k\|$ (between $W_{2,c}$ and the bound).

**Control.** The same $N$ with the first three sequences a convolution triple
$\{\mu, \nu, \mu*\nu\}$ (discrete), whose LSEs satisfy $\mathrm{LSE}_\mu + \mathrm{LSE}_\nu -
\mathrm{LSE}_{\mu*\nu} = 0$: the full readout NTK has the $d$-dimensional kernel
$(1, 1, -1, 0..)\otimes\mathbb{R}^d$. A teacher's targets would hide the failure (their residual
$Y(\nu^*) - Y(\nu_0) = \varepsilon J\xi + O(\varepsilon^2)$ lies in the range of $K$ to first
order), so the control fits generic targets $Y^* = e + \delta$, $\delta$ Gaussian scaled to the
initial loss of the smallest-$\varepsilon$ run: the question the criterion answers is whether
*every* small residual can be followed. It trains for the same time $T$ (its own stable $\tau$)
and reports `kernel_residual` $= |P_{\ker K_0} r|^2/(2N)$, the part of the loss in the kernel.

**results.json:** `{"runs": [{"epsilon", "lambda_min", "lambda_max", "predicted_slope",
"late_slope", "initial_loss", "final_loss", "w2c", "w2c_bound", "path_length",
"lambda_min_end", "linearised_late_slope", "slope_ratio", "stderr": {key: standard
error}}], "control": {"family", "final_loss",
"initial_loss", "kernel_residual", "kernel_residual_initial", "kernel_dim", "trace": [{"t",
"loss", "kernel_residual", "lambda_min"}]}, "certificate": {"passes", "mod_constants_ratio",
"ntk_ratio"}, "settings": {...}}`. Each number is the mean over `seeds` seeds (different
sequences, heads and displacement), with standard errors; `late_slope` is fitted on the last
third of $\log R$ against $t$, `slope_ratio` is late/predicted per seed (then averaged), and
`linearised_late_slope` the same fit on the linearised dynamics $r_{k+1} = (I - \tau K_0/N)r_k$
(NTK frozen at $\nu_0$): it separates the slowest mode not yet dominating over the window
(present in both) from the NTK moving (only in the trained run); `lambda_min`/`lambda_max` are those of $K_0$ (the same for all
$\varepsilon$), `lambda_min_end` of $K_{\nu_T}$.

**CPU time** (2-core CPU shared with other jobs, 2026-11-30, `meanfield-tf experiment run
convergence`): `--quick` (L = 4, M = 16, 2 seeds) 76 s of CPU (283 s wall under a load average
of about 20). The defaults (L = 8, M = 64, 5 seeds, about 2000 Euler steps per run) were not
completed on that machine: one run went at about 0.4 s of wall time per step under that load.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ._convergence_figures import figures as _figures
from ._teacher import (
    Trainer,
    enable_float64,
    generic_sequences,
    late_slope,
    mean_stderr,
    ntk_spectrum,
    readout,
    readout_query,
)

NAME = "convergence"
CLAIM = ("With an injective NTK the mean-field gradient flow converges globally from a small "
         "initial loss, at the asymptotic rate 2 lambda_min(K)/N, its heads staying within "
         "O(sqrt(R0/lambda_min)) of the initialisation.")


@dataclasses.dataclass(frozen=True)
class Config:
    seed: int = 0
    seeds: int = 5
    num_layers: int = 8
    num_heads: int = 64
    num_sequences: int = 4
    num_tokens: int = 9          # the control's convolution has 9 atoms: same shapes, one compile
    spread: float = 1.0
    epsilons: tuple[float, ...] = (0.01, 0.1, 1.0)
    step_fraction: float = 0.5   # tau = step_fraction * N / lambda_max(K0)
    horizon: float = 10.0        # T = horizon * N / lambda_min(K0)
    snapshots: int = 8           # NTK and W2,c evaluated this many times along each run
    max_steps: int = 20000


QUICK = {"seeds": 2, "num_layers": 4, "num_heads": 16, "snapshots": 4}

_DIM = 2


def _solve_kwargs(cfg: Config) -> dict:
    """The depth-solve options of every flow, gradient and NTK call: the finite transformer
    (explicit Euler, one step per layer, dense attention)."""
    import diffrax

    import meanfield_tf as mf

    return {"solver": mf.DepthSolver(diffrax.Euler(), mf.FixedSteps(1), mf.DenseKernel())}


def _check(cfg: Config) -> None:
    from meanfield_tf import ConfigError

    if cfg.seeds < 1 or cfg.num_layers < 1 or cfg.num_heads < 2 or cfg.num_heads % 2:
        raise ConfigError("need seeds >= 1, num_layers >= 1 and an even num_heads >= 2")
    if cfg.num_sequences < 4:
        raise ConfigError(f"num_sequences must be >= 4 (the control holds a convolution triple "
                          f"plus one more sequence), got {cfg.num_sequences}")
    if cfg.num_tokens < 1 or not cfg.spread > 0:
        raise ConfigError("num_tokens must be >= 1 and spread > 0")
    if not all(e > 0 for e in cfg.epsilons):
        raise ConfigError(f"epsilons must be positive, got {cfg.epsilons}")
    if not 0 < cfg.step_fraction < 1:
        raise ConfigError(f"step_fraction must be in (0, 1) (tau lambda_max / N < 1), "
                          f"got {cfg.step_fraction}")
    if not cfg.horizon > 0 or cfg.snapshots < 1:
        raise ConfigError("horizon must be > 0 and snapshots >= 1")


def _control_tokens(key, cfg: Config):
    """$\\{\\mu, \\nu, \\mu*\\nu\\}$ (3 atoms each, 9 for the convolution) plus generic sequences."""
    import jax
    import jax.numpy as jnp

    import meanfield_tf as mf

    km, kn, kw, kg = jax.random.split(key, 4)
    mu_a = 0.7 * jax.random.normal(km, (3, _DIM), jnp.float64)
    nu_a = 0.7 * jax.random.normal(kn, (3, _DIM), jnp.float64)
    w = jax.random.uniform(kw, (2, 3), jnp.float64, 0.5, 1.5)
    w = w / w.sum(axis=1, keepdims=True)
    mu, nu = mf.Discrete(mu_a, w[0]), mf.Discrete(nu_a, w[1])
    conv = mf.Discrete((mu_a[:, None] + nu_a[None]).reshape(-1, _DIM),
                       (w[0][:, None] * w[1][None]).reshape(-1))
    rest = cfg.spread * jax.random.normal(kg, (cfg.num_sequences - 3, max(9, cfg.num_tokens), _DIM),
                                         jnp.float64)
    families = [mu, nu, conv] + [mf.Discrete(x) for x in rest]
    return mf.sample_tokens(jax.random.PRNGKey(0), families, max(9, cfg.num_tokens))


def _certificate(tokens, key) -> dict:
    import meanfield_tf as mf

    cert = mf.injectivity_certificate(tokens, key=key, num_samples=256)
    return {"passes": bool(cert.tests["mod_constants"].independent and cert.agree),
            "mod_constants_ratio": cert.tests["mod_constants"].ratio,
            "ntk_ratio": cert.ntk.blocks["full"].ratio}


def _one_seed(cfg: Config, s: int, trainer: Trainer, progress) -> dict:
    import jax
    import jax.numpy as jnp

    import meanfield_tf as mf

    kw = _solve_kwargs(cfg)
    kx, kh, kxi, kc, kd, kcert = jax.random.split(jax.random.PRNGKey(cfg.seed + s), 6)
    N, L, M = cfg.num_sequences, cfg.num_layers, cfg.num_heads
    e = readout_query(_DIM)
    tokens = generic_sequences(kx, N, cfg.num_tokens, _DIM, cfg.spread)
    cert = _certificate(tokens, kcert)
    tokens_q = tokens.append_query(e)
    heads0 = mf.symmetric_heads(kh, L, M, _DIM, dtype=jnp.float64)
    K0 = ntk_spectrum(heads0, tokens_q, kw)
    lmin, lmax = float(K0.lambda_min), float(K0.lambda_max)
    slope = mf.predicted_slope(lmin, N)
    tau = cfg.step_fraction * N / lmax
    T = cfg.horizon * N / lmin
    steps = math.ceil(T / tau)
    if steps > cfg.max_steps:
        raise mf.ConfigError(f"the run needs {steps} steps (condition number {lmax / lmin:.0f}) > "
                             f"max_steps={cfg.max_steps}; lower horizon or raise max_steps")
    every = max(1, steps // cfg.snapshots)
    forward = lambda h, t: mf.flow(h, t, **kw).x
    noise = mf.gaussian_heads(kxi, L, M, _DIM, dtype=jnp.float64)
    runs = []
    for eps in cfg.epsilons:
        teacher = mf.perturbed_heads(heads0, noise, eps)
        task = mf.TeacherStudent.make(teacher, tokens_q, forward, readout="query")
        traj = trainer.train(heads0, task.batch, tau=tau, steps=steps, snapshot_every=every,
                             progress=progress, label=f"seed {s} eps {eps:g}")
        snap_t, snap_lmin, snap_w2 = [], [], []
        for k, h in sorted(traj.snapshots.items()):
            snap_t.append(k * tau)
            snap_lmin.append(float(ntk_spectrum(h, tokens_q, kw).lambda_min))
            snap_w2.append(trainer.w2c(h, heads0))
        r0 = float(traj.loss[0])
        lin = _linearised_loss(np.asarray(K0.gram),
                               np.asarray(readout(heads0, tokens_q, kw) - task.batch.risk.y),
                               tau, steps)
        runs.append({
            "epsilon": eps, "lambda_min": lmin, "lambda_max": lmax,
            "predicted_slope": slope, "late_slope": late_slope(traj.t, traj.loss),
            "initial_loss": r0, "final_loss": float(traj.loss[-1]), "w2c": snap_w2[-1],
            "w2c_bound": math.sqrt(2 * N * r0 / lmin), "path_length": traj.path_length,
            "lambda_min_end": snap_lmin[-1],
            "linearised_late_slope": late_slope(traj.t, lin),
            "slope_ratio": late_slope(traj.t, traj.loss) / slope,
            "curve": {"t": traj.t.tolist(), "loss": traj.loss.tolist()},
            "snapshots": {"t": snap_t, "lambda_min": snap_lmin, "w2c": snap_w2},
        })
        progress(f"seed {s} eps {eps:g}: R {r0:.2e} -> {traj.loss[-1]:.2e}, late slope "
                 f"{runs[-1]['late_slope']:.4g} (predicted {slope:.4g})")
    control = _control(cfg, kc, kd, runs[int(np.argmin(cfg.epsilons))]["initial_loss"], T, s,
                       trainer, progress)
    return {"cert": cert, "runs": runs, "control": control, "tau": tau, "T": T, "steps": steps}


def _linearised_loss(K: np.ndarray, r0: np.ndarray, tau: float, steps: int) -> np.ndarray:
    """The risk of the linearised dynamics $r_{k+1} = (I - \\tau K_0/N) r_k$ (Euler of
    $dr/dt = -K_0 r/N$ with the NTK frozen at initialisation), `(steps + 1,)`."""
    n = r0.shape[0]
    evals, evecs = np.linalg.eigh(K)
    c = evecs.T @ r0.reshape(-1)
    k = np.arange(steps + 1)[:, None]
    modes = c[None] ** 2 * (1 - tau * evals[None] / n) ** (2 * k)
    return modes.sum(axis=1) / (2 * n)


def _control(cfg: Config, key, key_delta, initial_loss: float, T: float, s: int,
             trainer: Trainer, progress):
    import jax
    import jax.numpy as jnp

    import meanfield_tf as mf

    kw = _solve_kwargs(cfg)
    N = cfg.num_sequences
    e = readout_query(_DIM)
    kt, kh, kcert = jax.random.split(key, 3)
    tokens = _control_tokens(kt, cfg)
    cert = _certificate(tokens, kcert)
    tokens_q = tokens.append_query(e)
    heads0 = mf.symmetric_heads(kh, cfg.num_layers, cfg.num_heads, _DIM, dtype=jnp.float64)
    K0 = ntk_spectrum(heads0, tokens_q, kw)
    lmax = float(K0.lambda_max)
    evals, evecs = np.linalg.eigh(np.asarray(K0.gram))
    null = evecs[:, evals <= 1e-12 * lmax]           # (N d, k): ker K0
    delta = np.array(jax.random.normal(key_delta, (N, _DIM), jnp.float64))
    delta *= math.sqrt(2 * N * initial_loss) / np.linalg.norm(delta)
    y = jnp.asarray(np.asarray(e)[None] + delta)
    batch = mf.Batch(tokens_q, mf.QueryRegression(y))
    tau = cfg.step_fraction * N / lmax
    steps = min(math.ceil(T / tau), cfg.max_steps)
    traj = trainer.train(heads0, batch, tau=tau, steps=steps,
                         snapshot_every=max(1, steps // cfg.snapshots), progress=progress,
                 label=f"seed {s} control")
    trace = []
    for k, h in sorted(traj.snapshots.items()):
        r = np.asarray(readout(h, tokens_q, kw) - y).reshape(-1)
        pr = null.T @ r
        trace.append({"t": k * tau, "loss": float(traj.loss[k]),
                      "kernel_residual": float(pr @ pr / (2 * N)),
                      "lambda_min": float(ntk_spectrum(h, tokens_q, kw).lambda_min)})
    progress(f"seed {s} control: R {traj.loss[0]:.2e} -> {traj.loss[-1]:.2e}, kernel part "
             f"{trace[0]['kernel_residual']:.2e} -> {trace[-1]['kernel_residual']:.2e}")
    return {"cert": cert, "initial_loss": float(traj.loss[0]), "final_loss": float(traj.loss[-1]),
            "kernel_residual": trace[-1]["kernel_residual"],
            "kernel_residual_initial": trace[0]["kernel_residual"], "kernel_dim": null.shape[1],
            "trace": trace, "curve": {"t": traj.t.tolist(), "loss": traj.loss.tolist()}}


_RUN_KEYS = ("lambda_min", "lambda_max", "predicted_slope", "late_slope", "initial_loss",
             "final_loss", "w2c", "w2c_bound", "path_length", "lambda_min_end",
             "linearised_late_slope", "slope_ratio")


def run(cfg: Config, out: Path, progress: Callable[[str], None]) -> dict:
    """Train every epsilon and the control for `cfg.seeds` seeds; write the three figures."""
    _check(cfg)
    enable_float64()
    trainer = Trainer(_solve_kwargs(cfg))
    per_seed = [_one_seed(cfg, s, trainer, progress) for s in range(cfg.seeds)]
    runs = []
    for i, eps in enumerate(cfg.epsilons):
        row, err = {"epsilon": eps}, {}
        for k in _RUN_KEYS:
            row[k], err[k] = mean_stderr([p["runs"][i][k] for p in per_seed])
        row["stderr"] = err
        runs.append(row)
    ctrl = [p["control"] for p in per_seed]
    control = {"family": "convolution triple {mu, nu, mu*nu} + "
                         f"{cfg.num_sequences - 3} generic sequence(s), generic targets"}
    for k in ("initial_loss", "final_loss", "kernel_residual", "kernel_residual_initial"):
        control[k] = mean_stderr([c[k] for c in ctrl])[0]
    control["kernel_dim"] = int(min(c["kernel_dim"] for c in ctrl))
    control["certificate_passes"] = all(c["cert"]["passes"] for c in ctrl)
    control["trace"] = ctrl[0]["trace"]
    certs = [p["cert"] for p in per_seed]
    results = {
        "runs": runs, "control": control,
        "certificate": {"passes": all(c["passes"] for c in certs),
                        "mod_constants_ratio": min(c["mod_constants_ratio"] for c in certs),
                        "ntk_ratio": min(c["ntk_ratio"] for c in certs)},
        "settings": {"num_layers": cfg.num_layers, "num_heads": cfg.num_heads,
                     "num_sequences": cfg.num_sequences, "seeds": cfg.seeds,
                     "tau": [p["tau"] for p in per_seed], "T": [p["T"] for p in per_seed],
                     "steps": [p["steps"] for p in per_seed]},
    }
    _figures(per_seed, results, out)
    return results


def rows(results: dict) -> list[dict]:
    """One row per epsilon, plus the control."""
    out = []
    for r in results["runs"]:
        out.append({"run": f"eps={r['epsilon']:g}", "R0": f"{r['initial_loss']:.2e}",
                    "R_T": f"{r['final_loss']:.2e}",
                    "late_slope": f"{r['late_slope']:.4g} ± {r['stderr']['late_slope']:.2g}",
                    "predicted": f"{r['predicted_slope']:.4g}",
                    "W2c": f"{r['w2c']:.2e}", "bound": f"{r['w2c_bound']:.2e}"})
    c = results["control"]
    out.append({"run": "control", "R0": f"{c['initial_loss']:.2e}", "R_T": f"{c['final_loss']:.2e}",
                "late_slope": "", "predicted": "", "W2c": "",
                "bound": f"ker part {c['kernel_residual']:.2e}"})
    return out


def discussion(results: dict) -> str:
    """One paragraph from the numbers of `results`."""
    runs = results["runs"]
    small, large = runs[0], runs[-1]
    c = results["control"]
    rel = abs(small["slope_ratio"] - 1)
    lin, late, pred = (small[k] for k in ("linearised_late_slope", "late_slope",
                                          "predicted_slope"))
    cause = ("the difference is the faster modes not yet gone, not the NTK moving"
             if abs(late - lin) < abs(lin - pred) else
             "the NTK moving along the run accounts for most of the difference")
    txt = (
        f"Starting from the symmetric zero-velocity initialisation with sequences that pass the "
        f"certificate ({'all seeds' if results['certificate']['passes'] else 'NOT all seeds'}), "
        f"the risk at ε = {small['epsilon']:g} falls from {small['initial_loss']:.1e} to "
        f"{small['final_loss']:.1e}, with a late slope of log R of {small['late_slope']:.4g} "
        f"against the predicted −2λ_min(K)/N = {small['predicted_slope']:.4g} "
        f"(per seed {100 * rel:.1f}% apart on average; the linearised dynamics with the NTK "
        f"frozen at initialisation give {small['linearised_late_slope']:.4g} over the same "
        f"window: {cause}). The heads move W2,c = {small['w2c']:.1e}, below the bound "
        f"√(2NR₀/λ_min) = {small['w2c_bound']:.1e}. At ε = {large['epsilon']:g} the loss goes "
        f"from {large['initial_loss']:.1e} to {large['final_loss']:.1e}, late slope "
        f"{large['late_slope']:.4g} against {large['linearised_late_slope']:.4g} for the frozen "
        f"NTK (λ_min moves from {large['lambda_min']:.3g} to {large['lambda_min_end']:.3g}): "
        + ("at this size the large displacement does not slow convergence, so the theorem's "
           "small-initial-loss condition is not tight here. "
           if large["late_slope"] <= small["late_slope"] else
           "it converges more slowly than the lazy prediction, as the theorem allows outside "
           "the small-loss regime. ")
        + f"The control ({c['family']}) has a {c['kernel_dim']}-dimensional "
        f"kernel; its loss goes from {c['initial_loss']:.1e} to {c['final_loss']:.1e} over the "
        f"same training time, of which {c['kernel_residual']:.1e} sits in ker K "
        f"(initially {c['kernel_residual_initial']:.1e}): the part the NTK cannot see does not "
        f"decay at first order."
    )
    return txt
