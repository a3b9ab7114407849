"""`meanfield-tf ntk`: certify the log-sum-exp injectivity criterion of the attention NTK.

Inputs are empirical sequences (`--tokens T.npz`) or a YAML config listing sequences as analytic
families or sets of atoms (`--config C.yaml`). The JSON report holds, for each test
(`mod_affine`, `mod_constants`, `hessian`, `ntk`), `ratio`, `independent`, `threshold` and
`null_vector` (one coefficient per sequence). See `docs/ntk.md`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

TESTS = ("mod_affine", "mod_constants", "hessian", "ntk")


@dataclasses.dataclass(frozen=True)
class NTKConfig:
    """The `ntk` command's YAML config.

    - `sequences`: one spec per sequence: `{family: gaussian, mean, cov}`,
      `{family: mixture, weights, means, covs}`, `{family: box, low, high}`,
      `{family: ball, center, radius}`, `{family: discrete, atoms, weights (optional)}`;
      `copies: k` repeats a spec.
    - `seed`: PRNG seed of the z samples and of the head sample.
    - `num_samples`: number of z samples S (LSE and Hessian tests; S distinct heads for the NTK).
    - `z_scale`: standard deviation of the z samples (moderate: about 1/spread of the tokens).
    - `num_heads`: M of the symmetric head sample (default 2 S).
    - `query`: the readout query token e (default (1,..,1)/sqrt(d)).
    - `safety`: the threshold's safety factor (threshold = safety x eps x sqrt(rows)).
    - `num_tokens`: if set, every continuous family is replaced by `num_tokens` sampled tokens and
      all tests certify those empirical sequences (the NTK then runs through the finite model).
    """

    sequences: list[dict] = dataclasses.field(default_factory=list)
    seed: int = 0
    num_samples: int = 512
    z_scale: float = 1.0
    num_heads: int | None = None
    query: list[float] | None = None
    safety: float = 100.0
    num_tokens: int | None = None

    def __post_init__(self):
        from .._errors import ConfigError

        for name in ("num_samples", "z_scale", "safety"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if self.num_heads is not None and (self.num_heads < 2 or self.num_heads % 2):
            raise ConfigError(f"num_heads must be an even integer >= 2, got {self.num_heads}")
        if self.num_tokens is not None and self.num_tokens < 1:
            raise ConfigError(f"num_tokens must be a positive integer, got {self.num_tokens}")


def register(sub) -> None:
    p = sub.add_parser(
        "ntk",
        help="certify injectivity of the attention NTK (LSE criterion)",
        description="Test whether the functions z -> LSE_i(z), one per sequence, are linearly "
        "independent modulo affine functions (query-key block of the readout-query NTK) and "
        "modulo constants (value block), by three tests that must agree: sampled LSE columns, "
        "tilted-covariance (Hessian) rank, and the Monte-Carlo NTK at the symmetric "
        "zero-velocity initialisation.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--tokens", help="npz with x (B,n,d) and optional w (B,n): empirical sequences")
    src.add_argument("--config", help="YAML config: sequences (families or atoms) and options")
    p.add_argument("--out", default="ntk_report.json", help="JSON report (default ntk_report.json)")
    p.add_argument("--plot", default=None, help="PNG of the singular-value spectra of the tests")
    opt = p.add_argument_group("options (override the config)")
    opt.add_argument("--seed", type=int, default=None)
    opt.add_argument("--num-samples", type=int, default=None, help="number of z samples")
    opt.add_argument("--z-scale", type=float, default=None, help="standard deviation of z")
    opt.add_argument("--num-heads", type=int, default=None, help="heads of the NTK test (even)")
    p.set_defaults(func=run)


def _resolve(args):
    """(config, families, descriptions) from the arguments."""
    from .. import config as cfgmod
    from .._errors import ConfigError
    from .._injectivity import families_from_tokens
    from ..io import load_tokens
    from . import options

    dtype = options.dtype_from_name("float64")  # the certificate is a rounding-level test
    if args.config is not None:
        cfg = cfgmod.from_dict(NTKConfig, cfgmod.read_yaml(args.config))
        if not cfg.sequences:
            raise ConfigError(f"{args.config}: sequences must list at least one sequence "
                              f"(e.g. - {{family: gaussian, mean: [0, 0], cov: [[1, 0], [0, 1]]}})")
    else:
        cfg = NTKConfig()
    over = {"seed": args.seed, "num_samples": args.num_samples, "z_scale": args.z_scale,
            "num_heads": args.num_heads}
    cfg = dataclasses.replace(cfg, **{k: v for k, v in over.items() if v is not None})
    if args.tokens is not None:
        tokens = load_tokens(args.tokens, dtype)
        fams = families_from_tokens(tokens)
        return cfg, fams, [f"tokens[{i}]" for i in range(len(fams))]
    fams, names = [], []
    for i, spec in enumerate(cfg.sequences):
        fam = cfgmod.family_from_spec(spec, f"sequences[{i}]", dtype)
        for _ in range(spec.get("copies", 1)):
            fams.append(fam)
            names.append(f"sequences[{i}] ({spec['family']})")
    return cfg, fams, names


def _empirical(families, num_tokens: int, seed: int):
    """Replace continuous families by `num_tokens` samples (Discrete sequences are kept)."""
    import jax

    from .._tokens import Discrete

    keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(families))
    out = []
    for f, k in zip(families, keys):
        if isinstance(f, Discrete):
            out.append(f)
        else:
            x, w = f.tokens(k, num_tokens)
            out.append(Discrete(x, w))
    return out


def build_report(cert, names, cfg) -> dict:
    """The JSON-serialisable report of a `Certificate`."""
    import numpy as np

    report = {name: cert.tests[name].to_dict() for name in TESTS}
    scale = cert.ntk.num_heads  # L = 1: the traced Gram is L*M*sigma^2
    sv = np.asarray(cert.ntk.blocks["A"].singular_values)
    report["ntk"].update(
        source=cert.ntk.source,
        block="A",
        gram_lambda_max=float(scale * sv[0] ** 2),
        gram_lambda_min=float(scale * sv[-1] ** 2),
        blocks={k: v.to_dict() for k, v in cert.ntk.blocks.items()},
    )
    report["agree"] = bool(cert.agree)
    report["sequences"] = list(names)
    report["settings"] = {
        "seed": cfg.seed, "num_samples": cert.num_samples, "z_scale": cert.z_scale,
        "num_heads": cert.ntk.num_heads, "safety": cfg.safety, "num_tokens": cfg.num_tokens,
        "moduli": {"mod_affine": "affine", "hessian": "affine", "ntk": "affine (query-key block)",
                   "mod_constants": "constants", "ntk.blocks.V": "constants",
                   "ntk.blocks.full": "constants"},
    }
    return report


def plot_spectra(report: dict, path) -> None:
    """Normalised singular values of every test, with their thresholds (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    curves = [(name, report[name]) for name in TESTS]
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
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args) -> int:
    import jax
    import jax.numpy as jnp

    from .._errors import ConfigError, InputError
    from .._injectivity import injectivity_certificate

    cfg, fams, names = _resolve(args)
    if cfg.num_tokens is not None and args.tokens is None:
        fams = _empirical(fams, cfg.num_tokens, cfg.seed)
    query = None if cfg.query is None else jnp.asarray(cfg.query, jnp.float64)
    try:
        cert = injectivity_certificate(
            fams, key=jax.random.PRNGKey(cfg.seed), num_samples=cfg.num_samples,
            z_scale=cfg.z_scale, num_heads=cfg.num_heads, query=query, safety=cfg.safety,
        )
    except InputError as err:
        if args.config is not None:
            raise ConfigError(f"{args.config}: {err}") from None
        raise
    report = build_report(cert, names, cfg)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    if args.plot:
        plot_spectra(report, args.plot)
    verdict = {name: ("independent" if report[name]["independent"] else "DEPENDENT")
               for name in TESTS}
    print(f"meanfield-tf ntk: {len(fams)} sequences; "
          + ", ".join(f"{k}: {v} (ratio {report[k]['ratio']:.2e})" for k, v in verdict.items())
          + f"; tests agree: {report['agree']}; report: {out}")
    return 0
