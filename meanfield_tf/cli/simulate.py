"""`meanfield-tf simulate`: push token measures through a transformer and save the states."""

from __future__ import annotations

import argparse

import numpy as np

from . import options


def register(sub) -> None:
    p = sub.add_parser(
        "simulate",
        help="run the forward flow of token measures",
        description="Run the forward flow dX/ds = v[nu_s, mu_s](X) on s in [0, 1]. Inputs are "
        "either --tokens and --heads .npz files, or --config (tokens and heads generated from "
        "families with a seed). Default: explicit Euler with one step per layer, i.e. the finite "
        "transformer X <- X + (1/L)(1/M) sum_m a_m(X).",
    )
    src = p.add_argument_group("inputs")
    src.add_argument("--tokens", help="npz with x (B,n,d) and optional w (B,n)")
    src.add_argument("--heads", help="npz with A and V, each (L,M,d,d) (or Q, K, V factored); optional MLP units U, W (L,M',d), b (L,M')")
    src.add_argument("--config", help="YAML config generating tokens and heads (see configs/)")
    src.add_argument("--interpolation", choices=["piecewise", "linear"], default=None,
                     help="depth interpolation of --heads (linear: L+1 nodes; default: the "
                     "file's `interpolation` key, as `meanfield-tf export` writes, else piecewise)")
    src.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                     help="dotted config overrides, e.g. heads.layers=16")
    options.add_solver_flags(p)
    out = p.add_argument_group("outputs")
    out.add_argument("--out", default="simulate.npz",
                     help="output npz: x (B,n,d), s (T,), xs (T,B,n,d) (default simulate.npz in "
                     "the working directory; an existing file is kept unless --force)")
    out.add_argument("--force", action="store_true", help="overwrite an existing --out file")
    out.add_argument("--num-saves", type=int, default=None,
                     help="save at this many uniform depths in [0, 1] (default: every layer edge)")
    out.add_argument("--plot", default=None, help="PNG of token trajectories (first two coordinates)")
    out.add_argument("--gaussian-exact", action="store_true",
                     help="also solve the exact Gaussian moment flow of every Gaussian sequence of "
                     "--config and report its distance to the simulated moments")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .._errors import InputError
    from ..workflow import simulation
    from ..workflow.files import check_output_path, save_npz_atomic

    check_output_path(args.out, "--out")
    if args.plot:
        check_output_path(args.plot, "--plot")  # before anything is computed or written
    if Path(args.out).is_file() and not args.force:
        raise InputError(f"{args.out} exists; give another --out, or --force to overwrite it")
    sim = simulation.resolve(
        tokens_path=args.tokens, heads_path=args.heads, config_path=args.config,
        overrides=args.overrides, interpolation=args.interpolation,
        flags={"dtype": args.dtype, "num_saves": args.num_saves, **options.solver_flags(args)})
    sol = sim.run()
    x = np.asarray(sol.x)
    save_npz_atomic(args.out, x=x, s=np.asarray(sol.s), xs=np.asarray(sol.xs))
    B, n, d = sim.tokens.x.shape
    heads, sc = sim.heads, sim.cfg.solver
    print(f"simulated B={B} sequences of n={n} tokens in d={d} through L={heads.num_layers} "
          f"layers x M={heads.num_heads} heads"
          f"{f' + {heads.num_units} units' if heads.has_units else ''} ({sc.name}, {int(np.asarray(sol.num_steps).sum())} "
          f"steps, {sim.cfg.dtype}); wrote {Path(args.out).resolve()}")
    disp = np.linalg.norm(x - np.asarray(sol.xs[0]), axis=-1)  # X_0 after any projection
    print(f"token displacement |X_1 - X_0|: mean {disp.mean():.4g}, max {disp.max():.4g}")
    if args.gaussian_exact:
        print("exact Gaussian moment flow vs empirical moments of the simulated tokens")
        print("(the s = 0 column is the sampling error; it falls like n^-1/2):")
        print("  seq | mean err s=0 | mean err s=1 | cov err s=0 | cov err s=1")
        for b, m0, m1, c0, c1 in simulation.gaussian_errors(sim, sol):
            print(f"  {b:3d} | {m0:12.4g} | {m1:12.4g} | {c0:11.4g} | {c1:11.4g}")
    if args.plot:
        from ..workflow.figures import plot_trajectories
        from ..workflow.figures_run import family_titles

        titles = None if sim.families is None else family_titles(sim.cfg.tokens.families)
        plot_trajectories(args.plot, sol.xs, sim.tokens.w, sol.s, titles=titles,
                          title=f"token trajectories (L={heads.num_layers}, M={heads.num_heads})")
        print(f"wrote {args.plot}")
    return 0
