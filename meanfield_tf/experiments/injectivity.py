r"""`injectivity`: the log-sum-exp criterion of NTK injectivity, certified on families and controls.

**Claim.** At the symmetric zero-velocity initialisation the readout-query NTK is injective on
its query-key block iff $\mathrm{LSE}_{\mu^1}, \dots, \mathrm{LSE}_{\mu^N}$ are linearly
independent modulo affine functions, and on its value block (and in full) iff they are
independent modulo constants, with $\mathrm{LSE}_\mu(z) = \log\int e^{\langle z, y\rangle}d\mu(y)$.

**What runs.** For every case (a set of $N$ sequences in $d = 2$) the certificate
`mf.injectivity_certificate` (float64) gives the ratio $\sigma_{\min}/\sigma_{\max}$ of six
singular-value tests: `mod_affine` and `mod_constants` (sampled LSEs with affine functions or
constants projected out), `hessian` (tilted covariances), and the NTK Jacobian by block `A`,
`V`, `full`. A ratio at or below the test's rounding threshold (safety × eps × √rows) means
"dependent". Independent cases (several sequences of one family with distinct parameters):
three discrete sequences, boxes, balls, Gaussians ($N = 3 = d(d+1)/2$ with independent
covariances) and Gaussian mixtures. Negative controls, with the dependence they carry:

- `translate` $\{\mu, \mu * \delta_a, \nu\}$: $\mathrm{LSE}_{\mu*\delta_a} = \mathrm{LSE}_\mu +
  \langle a, z\rangle$, dependent modulo affine, independent modulo constants.
- `dirac` $\{\mu, \nu, \delta_a\}$, $a \ne 0$: $\mathrm{LSE}_{\delta_a} = \langle a, z\rangle$ is
  affine; dependent modulo affine only.
- `convolution` $\{\mu, \nu, \mu * \nu\}$ (discrete, $\mu*\nu = \sum_{jk} w_j v_k
  \delta_{a_j + b_k}$): $\mathrm{LSE}_{\mu*\nu} = \mathrm{LSE}_\mu + \mathrm{LSE}_\nu$, an exact
  linear dependence with coefficients $(1, 1, -1)$, hence dependent modulo constants (and
  affine): the full readout NTK is singular.
- `gaussians-4`: four Gaussians; their LSEs $\langle m, z\rangle + \frac12 z^\top\Sigma z$ are
  quadratics, and modulo affine functions quadratic forms span $d(d+1)/2 = 3$ dimensions:
  dependent modulo affine, independent modulo constants (generic means).
- `gaussians-6`: six Gaussians; modulo constants the quadratics without constant term span
  $d(d+1)/2 + d = 5$ dimensions: dependent modulo constants too.

Each case is certified with `seeds` independent $z$ and head samples (keys `seed + s`); the
reported ratios are the mean over seeds (standard errors under `stderr`), the verdicts must hold
in every seed. The z-scale sweep repeats the certificate of a weak independent case (`ball`) and
a control (`convolution`) for $\sigma_z$ on a geometric grid.

**results.json:** `{"cases": [{"name", "N", "mod_affine_ratio", "mod_constants_ratio",
"hessian_ratio", "ntk_A_ratio", "ntk_V_ratio", "ntk_ratio", "tests_agree", "control",
"expected_independent_affine", "expected_independent_constants", "independent_affine",
"independent_constants", "verdicts_right", "thresholds", "stderr"}], "z_scale_sweep":
[{"name", "z_scale", "<test>_ratio"...}], "thresholds": {test: threshold}, "num_samples",
"seeds"}`. `ntk_ratio` is the full NTK (A and V blocks together); `independent_*` are the
verdicts of `mod_affine` / `mod_constants`.

**CPU time** (2-core CPU shared with other jobs, 2026-11-30, `meanfield-tf experiment run
injectivity`): `--quick` 18 s of CPU (57 s wall); defaults (S = 512, 5 seeds) 31 s of CPU
(316 s wall under a load average of about 20).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ._teacher import enable_float64, figure, mean_stderr, save

NAME = "injectivity"
CLAIM = ("The readout-query NTK at the symmetric zero-velocity initialisation is injective iff "
         "the LSEs of the sequences are independent (modulo affine: query-key block; modulo "
         "constants: value block and full NTK).")

_TESTS = ("mod_affine", "mod_constants", "hessian", "ntk_A", "ntk_V", "ntk")


@dataclasses.dataclass(frozen=True)
class Config:
    seed: int = 0
    seeds: int = 5
    num_samples: int = 512      # S, z samples per test (the NTK uses 2 S heads: S distinct)
    z_scale: float = 1.0        # sigma_z of the main certificate
    sweep_min: float = 0.25     # z-scale sweep: geometric grid from sweep_min to sweep_max
    sweep_max: float = 4.0
    sweep_points: int = 9
    safety: float = 100.0       # threshold = safety * eps * sqrt(rows)


QUICK = {"seeds": 2, "num_samples": 256, "sweep_points": 5}


def _cases(seed: int):
    """`[(name, families, control, expected_affine, expected_constants)]` (d = 2, float64)."""
    import jax.numpy as jnp

    import meanfield_tf as mf

    rng = np.random.default_rng(seed)
    f64 = jnp.float64

    def discrete(k=5, spread=1.0):
        w = rng.uniform(0.5, 1.5, k)
        return mf.Discrete(jnp.asarray(spread * rng.standard_normal((k, 2)), f64),
                           jnp.asarray(w / w.sum(), f64))

    def spd():
        g = rng.standard_normal((2, 2))
        return g @ g.T / 2 + 0.3 * np.eye(2)

    def gaussian():
        return mf.Gaussian(jnp.asarray(rng.standard_normal(2), f64), jnp.asarray(spd(), f64))

    def mixture():
        w = rng.uniform(0.3, 0.7)
        return mf.GaussianMixture(jnp.asarray([w, 1 - w], f64),
                                  jnp.asarray(1.5 * rng.standard_normal((2, 2)), f64),
                                  jnp.asarray(np.stack([spd() / 2, spd() / 2]), f64))

    def convolve(mu, nu):
        atoms = (mu.atoms[:, None, :] + nu.atoms[None, :, :]).reshape(-1, 2)
        weights = (mu.weights[:, None] * nu.weights[None, :]).reshape(-1)
        return mf.Discrete(atoms, weights)

    low = lambda: jnp.asarray(rng.uniform(-1, 0, 2), f64)
    boxes = []
    for size in ([1.0, 1.0], [2.0, 0.5], [0.5, 1.5]):
        lo = low()
        boxes.append(mf.UniformBox(lo, lo + jnp.asarray(size, f64)))
    balls = [mf.UniformBall(jnp.asarray(rng.uniform(-0.5, 0.5, 2), f64), r)
             for r in (0.5, 1.0, 2.0)]
    mu, nu = discrete(3, 0.7), discrete(3, 0.7)
    base = discrete()
    shift = jnp.asarray([0.8, -0.5], f64)
    return [
        ("discrete", [discrete(), discrete(), discrete()], False, True, True),
        ("box", boxes, False, True, True),
        ("ball", balls, False, True, True),
        ("gaussian", [gaussian() for _ in range(3)], False, True, True),
        ("mixture", [mixture() for _ in range(3)], False, True, True),
        ("translate", [base, mf.Discrete(base.atoms + shift, base.weights), discrete()],
         True, False, True),
        ("dirac", [discrete(), discrete(), mf.Discrete(shift[None, :])], True, False, True),
        ("convolution", [mu, nu, convolve(mu, nu)], True, False, False),
        ("gaussians-4", [gaussian() for _ in range(4)], True, False, True),
        ("gaussians-6", [gaussian() for _ in range(6)], True, False, False),
    ]


def _certify(families, cfg: Config, seed: int, z_scale: float) -> dict:
    import jax

    import meanfield_tf as mf

    cert = mf.injectivity_certificate(families, key=jax.random.PRNGKey(seed),
                                      num_samples=cfg.num_samples, z_scale=z_scale,
                                      safety=cfg.safety)
    t, blk = cert.tests, cert.ntk.blocks
    tests = {"mod_affine": t["mod_affine"], "mod_constants": t["mod_constants"],
             "hessian": t["hessian"], "ntk_A": blk["A"], "ntk_V": blk["V"], "ntk": blk["full"]}
    return {"ratios": {k: v.ratio for k, v in tests.items()},
            "thresholds": {k: v.threshold for k, v in tests.items()},
            "independent": {k: v.independent for k, v in tests.items()},
            "agree": cert.agree}


def _check(cfg: Config) -> None:
    from meanfield_tf import ConfigError

    if cfg.seeds < 1:
        raise ConfigError(f"seeds must be >= 1, got {cfg.seeds}")
    if cfg.num_samples < 16:
        raise ConfigError(f"num_samples must be >= 16 (a few hundred is typical), "
                          f"got {cfg.num_samples}")
    if not 0 < cfg.sweep_min < cfg.sweep_max or cfg.sweep_points < 2:
        raise ConfigError("the z-scale sweep needs 0 < sweep_min < sweep_max and sweep_points >= 2")
    if not cfg.z_scale > 0 or not cfg.safety > 0:
        raise ConfigError("z_scale and safety must be > 0")


def run(cfg: Config, out: Path, progress: Callable[[str], None]) -> dict:
    """Certify every case over `cfg.seeds` seeds, sweep the z-scale, draw the two figures."""
    _check(cfg)
    enable_float64()
    cases = []
    for name, families, control, exp_aff, exp_const in _cases(cfg.seed):
        per_seed = [_certify(families, cfg, cfg.seed + s, cfg.z_scale) for s in range(cfg.seeds)]
        ratios = {k: mean_stderr([p["ratios"][k] for p in per_seed]) for k in _TESTS}
        indep = {k: [p["independent"][k] for p in per_seed] for k in _TESTS}
        aff = all(indep["mod_affine"]) if len(set(indep["mod_affine"])) == 1 else None
        const = all(indep["mod_constants"]) if len(set(indep["mod_constants"])) == 1 else None
        row = {"name": name, "N": len(families)}
        row.update({f"{k}_ratio": ratios[k][0] for k in _TESTS})
        row.update({
            "tests_agree": all(p["agree"] for p in per_seed),
            "control": control,
            "expected_independent_affine": exp_aff,
            "expected_independent_constants": exp_const,
            "independent_affine": aff,
            "independent_constants": const,
            "verdicts_right": aff == exp_aff and const == exp_const,
            "thresholds": per_seed[0]["thresholds"],
            "stderr": {f"{k}_ratio": ratios[k][1] for k in _TESTS},
        })
        cases.append(row)
        progress(f"{name}: mod_affine {row['mod_affine_ratio']:.2e} mod_constants "
                 f"{row['mod_constants_ratio']:.2e} agree {row['tests_agree']} "
                 f"right {row['verdicts_right']}")
    sweep = []
    by_name = {c[0]: c[1] for c in _cases(cfg.seed)}
    for name in ("ball", "convolution"):
        for z in np.geomspace(cfg.sweep_min, cfg.sweep_max, cfg.sweep_points):
            c = _certify(by_name[name], cfg, cfg.seed, float(z))
            entry = {"name": name, "z_scale": float(z)}
            entry.update({f"{k}_ratio": c["ratios"][k] for k in _TESTS})
            entry["agree"] = c["agree"]
            sweep.append(entry)
        progress(f"z-scale sweep of {name} done")
    results = {"cases": cases, "z_scale_sweep": sweep, "thresholds": cases[0]["thresholds"],
               "num_samples": cfg.num_samples, "seeds": cfg.seeds, "z_scale": cfg.z_scale}
    _figures(results, out)
    return results


_COLORS = {"mod_affine": "C0", "hessian": "C1", "ntk_A": "C2", "mod_constants": "C3",
           "ntk_V": "C4", "ntk": "C5"}


def _figures(results: dict, out: Path) -> None:
    from matplotlib.ticker import NullFormatter

    cases = results["cases"]
    fig, ax = figure(7.0, 4.2)
    x = np.arange(len(cases))
    offsets = np.linspace(-0.3, 0.3, len(_TESTS))
    floor = 1e-18
    for off, k in zip(offsets, _TESTS):
        y = np.maximum([c[f"{k}_ratio"] for c in cases], floor)
        err = [c["stderr"][f"{k}_ratio"] for c in cases]
        ax.errorbar(x + off, y, yerr=err, fmt="o", ms=4, color=_COLORS[k], label=k)
        ax.hlines(results["thresholds"][k], -0.5, len(cases) - 0.5, colors=_COLORS[k],
                  linestyles=":", lw=0.8)
    for i, c in enumerate(cases):
        if c["control"]:
            ax.axvspan(i - 0.45, i + 0.45, color="0.9", zorder=0)
    ax.set_yscale("log")
    ax.set_xticks(x)
    ax.set_xticklabels([c["name"] for c in cases], rotation=35, ha="right", fontsize=8)
    ax.set_ylabel(r"$\sigma_{\min}/\sigma_{\max}$ (0 drawn at 1e-18)")
    ax.set_title("LSE criterion: ratios per case (grey = negative controls,\n"
                 "dotted = rounding thresholds)", fontsize=9)
    ax.legend(fontsize=7, ncol=2, loc="lower left")
    save(fig, out, "injectivity_ratios")

    fig, axes = figure(7.0, 3.6)
    fig.clf()
    axes = fig.subplots(1, 2, sharey=True)
    for ax, name in zip(axes, ("ball", "convolution")):
        rows = [r for r in results["z_scale_sweep"] if r["name"] == name]
        z = [r["z_scale"] for r in rows]
        for k in _TESTS:
            ax.plot(z, np.maximum([r[f"{k}_ratio"] for r in rows], floor), "o-", ms=3,
                    color=_COLORS[k], label=k)
        ax.hlines(max(results["thresholds"].values()), z[0], z[-1], colors="k", linestyles=":",
                  lw=0.8, label="largest threshold")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xticks(z[:: max(1, len(z) // 4)])
        ax.set_xticklabels([f"{v:.3g}" for v in z[:: max(1, len(z) // 4)]])
        ax.set_xlabel(r"$\sigma_z$")
        ax.set_title(f"{name}", fontsize=9)
    axes[0].set_ylabel(r"$\sigma_{\min}/\sigma_{\max}$")
    axes[1].legend(fontsize=7)
    fig.suptitle("Certificate ratios against the z-scale", fontsize=10)
    save(fig, out, "injectivity_z_scale")


def rows(results: dict) -> list[dict]:
    """One row per case: the six ratios and the verdicts."""
    out = []
    for c in results["cases"]:
        row = {"case": c["name"], "N": c["N"], "control": "yes" if c["control"] else "no"}
        row.update({k: f"{c[f'{k}_ratio']:.1e}" for k in _TESTS})
        row["agree"] = c["tests_agree"]
        row["right"] = c["verdicts_right"]
        out.append(row)
    return out


def discussion(results: dict) -> str:
    """One paragraph from the numbers of `results`."""
    cases = results["cases"]
    indep = [c for c in cases if not c["control"]]
    ctrl = [c for c in cases if c["control"]]
    right = sum(c["verdicts_right"] for c in cases)
    agree = sum(c["tests_agree"] for c in cases)
    weakest = min(indep, key=lambda c: c["mod_affine_ratio"])
    worst_dep = max(c[f"{k}_ratio"] for c in ctrl for k in ("mod_affine", "hessian", "ntk_A"))
    sweep = [r for r in results["z_scale_sweep"] if r["name"] == weakest["name"]]
    txt = (
        f"Over {len(cases)} cases ({len(indep)} independent families, {len(ctrl)} negative "
        f"controls; {results['seeds']} seeds, S = {results['num_samples']} z samples) the "
        f"verdicts are right in {right} and the three tests agree in {agree}. The dependent "
        f"ratios of the controls stay at rounding level (largest {worst_dep:.1e}, thresholds "
        f"{min(results['thresholds'].values()):.1e} to {max(results['thresholds'].values()):.1e}), "
        f"while independent sets stay many orders above; the weakest independent case is "
        f"'{weakest['name']}' (mod-affine ratio {weakest['mod_affine_ratio']:.1e})"
    )
    txt += (", a uniform law whose LSE is close to quadratic at the sampled scale. "
            if weakest["name"] in ("ball", "box") else ". ")
    if sweep:
        txt += (f"Its ratio grows with the z-scale from {sweep[0]['mod_affine_ratio']:.1e} at "
                f"σ_z = {sweep[0]['z_scale']:g} to {sweep[-1]['mod_affine_ratio']:.1e} at "
                f"σ_z = {sweep[-1]['z_scale']:g}: the criterion is about the non-quadratic part "
                f"of the LSEs, which a small σ_z hides. ")
    txt += ("The departure from the theory is only numerical: the certificate decides exact "
            "(in)dependence through a rounding threshold, so a near-dependence below it would be "
            "reported as dependent.")
    return txt
