"""`meanfield-tf ntk`: certify the log-sum-exp injectivity criterion of the attention NTK.

Inputs are empirical sequences (`--tokens T.npz`) or a YAML config listing sequences as analytic
families or sets of atoms (`--config C.yaml`). The JSON report holds, for each test
(`mod_affine`, `mod_constants`, `hessian`, `ntk`), `ratio`, `independent`, `threshold` and
`null_vector` (one coefficient per sequence). See `docs/ntk.md`.
"""

from __future__ import annotations

import json
from pathlib import Path


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


def run(args) -> int:
    from ..workflow import certificate

    cfg, fams, names = certificate.resolve(
        tokens_path=args.tokens, config_path=args.config,
        options={"seed": args.seed, "num_samples": args.num_samples, "z_scale": args.z_scale,
                 "num_heads": args.num_heads})
    cert = certificate.certify(cfg, fams, config_path=args.config)
    report = certificate.report(cert, names, cfg)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    if args.plot:
        from ..workflow.figures import plot_spectra

        plot_spectra(report, args.plot, certificate.TESTS)
    verdict = {name: ("independent" if report[name]["independent"] else "DEPENDENT")
               for name in certificate.TESTS}
    print(f"meanfield-tf ntk: {len(fams)} sequences; "
          + ", ".join(f"{k}: {v} (ratio {report[k]['ratio']:.2e})" for k, v in verdict.items())
          + f"; tests agree: {report['agree']}; report: {out}")
    for name in ("mod_affine", "mod_constants"):  # the two moduli (the other tests agree)
        words = certificate.dependence(report, name)
        if words:
            print(f"  dependent modulo {'affine functions' if name == 'mod_affine' else 'constants'}"
                  f" ({name} null vector): {words} ≈ 0")
    return 0
