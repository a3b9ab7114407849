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
    src.add_argument("--heads", help="npz with A and V, each (L,M,d,d) (or Q, K, V factored)")
    src.add_argument("--config", help="YAML config generating tokens and heads (see configs/)")
    src.add_argument("--interpolation", choices=["piecewise", "linear"], default=None,
                     help="depth interpolation of --heads (linear: L+1 nodes)")
    src.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                     help="dotted config overrides, e.g. heads.layers=16")
    options.add_solver_flags(p)
    out = p.add_argument_group("outputs")
    out.add_argument("--out", default="simulate.npz", help="output npz: x (B,n,d), s (T,), xs (T,B,n,d)")
    out.add_argument("--num-saves", type=int, default=None,
                     help="save at this many uniform depths in [0, 1] (default: every layer edge)")
    out.add_argument("--plot", default=None, help="PNG of token trajectories (first two coordinates)")
    out.add_argument("--gaussian-exact", action="store_true",
                     help="also solve the exact Gaussian moment flow of every Gaussian sequence of "
                     "--config and report its distance to the simulated moments")
    p.set_defaults(func=run)


def _resolve(args):
    """(config, heads, tokens, gaussian families or None) from the arguments."""
    import jax

    from ..config import SimulateConfig, families_from_config, heads_from_config, load_config
    from ..config import tokens_from_config
    from .._errors import InputError
    from ..io import load_heads, load_tokens

    if args.config is None and (args.tokens is None or args.heads is None):
        if args.tokens or args.heads:
            raise InputError("give both --tokens and --heads, or --config")
        cfg = load_config(SimulateConfig, None, args.overrides)  # built-in default
    elif args.config is not None:
        if args.tokens or args.heads:
            raise InputError("give either --config or --tokens/--heads, not both")
        cfg = load_config(SimulateConfig, args.config, args.overrides)
    else:
        if args.overrides:
            raise InputError("KEY=VALUE overrides apply to --config only")
        cfg = SimulateConfig()
    overrides = {
        "dtype": args.dtype, "num_saves": args.num_saves,
    }
    solver_over = {"name": args.solver, "steps": args.steps, "rtol": args.rtol, "atol": args.atol,
                   "kernel": args.kernel, "chunk_size": args.chunk_size}
    import dataclasses

    cfg = dataclasses.replace(
        cfg, **{k: v for k, v in overrides.items() if v is not None},
        solver=dataclasses.replace(cfg.solver, **{k: v for k, v in solver_over.items() if v is not None}),
    )
    dtype = options.dtype_from_name(cfg.dtype)
    if args.tokens is not None:
        tokens = load_tokens(args.tokens, dtype)
        heads = load_heads(args.heads, dtype, interpolation=args.interpolation or "piecewise")
        gaussians = None
    else:
        key_t, key_h = jax.random.split(jax.random.PRNGKey(cfg.seed))
        tokens = tokens_from_config(cfg.tokens, key_t, dtype)
        heads = heads_from_config(cfg.heads, key_h, dtype)
        gaussians = families_from_config(cfg.tokens.families, dtype)
    return cfg, heads, tokens, gaussians


def run(args: argparse.Namespace) -> int:
    import jax.numpy as jnp

    from .._errors import InputError
    from .._flow import check_converged, flow
    from ..io import save_npz_atomic

    cfg, heads, tokens, families = _resolve(args)
    sc = cfg.solver
    solver = options.solver_from_name(sc.name)
    stepping = options.stepping_from_args(heads.num_layers, sc.steps, sc.rtol, sc.atol)
    kernel = options.kernel_from_name(sc.kernel, sc.chunk_size)
    depths = None if cfg.num_saves is None else jnp.linspace(0, 1, max(cfg.num_saves, 2),
                                                              dtype=heads.dtype)
    sol = flow(heads, tokens, solver=solver, stepping=stepping, kernel=kernel, depths=depths)
    check_converged(sol)
    x = np.asarray(sol.x)
    if not np.isfinite(x).all():
        raise InputError("the flow produced non-finite tokens (the heads are too large for this "
                         "solver/step); reduce the head scales or use more steps")
    save_npz_atomic(args.out, x=x, s=np.asarray(sol.s), xs=np.asarray(sol.xs))
    B, n, d = tokens.x.shape
    print(f"simulated B={B} sequences of n={n} tokens in d={d} through L={heads.num_layers} "
          f"layers x M={heads.num_heads} heads ({sc.name}, {int(np.asarray(sol.num_steps).sum())} "
          f"steps, {cfg.dtype}); wrote {args.out}")
    disp = np.linalg.norm(x - np.asarray(tokens.x), axis=-1)
    print(f"token displacement |X_1 - X_0|: mean {disp.mean():.4g}, max {disp.max():.4g}")
    if args.gaussian_exact:
        _report_gaussian(heads, tokens, families, sol)
    if args.plot:
        from ..plots import plot_trajectories

        plot_trajectories(args.plot, sol.xs, tokens.w, sol.s,
                          title=f"token trajectories (L={heads.num_layers}, M={heads.num_heads})")
        print(f"wrote {args.plot}")
    return 0


def _report_gaussian(heads, tokens, families, sol) -> None:
    from .._errors import InputError
    from .._gaussian import gaussian_flow
    from .._tokens import Gaussian

    if families is None or not any(isinstance(f, Gaussian) for f in families):
        raise InputError("--gaussian-exact needs --config with at least one gaussian family")
    w = np.asarray(tokens.w)
    xs = np.asarray(sol.xs)
    print("exact Gaussian moment flow vs empirical moments of the simulated tokens")
    print("(the s = 0 column is the sampling error; it falls like n^-1/2):")
    print("  seq | mean err s=0 | mean err s=1 | cov err s=0 | cov err s=1")
    for b, fam in enumerate(families):
        if not isinstance(fam, Gaussian):
            continue
        g = gaussian_flow(heads, fam.mean, fam.cov)
        errs = []
        for t in (0, -1):
            xt = xs[t, b]
            m = (w[b, :, None] * xt).sum(0)
            c = ((xt - m).T * w[b]) @ (xt - m)
            errs.append((np.linalg.norm(m - np.asarray(g.mean[t])),
                         np.linalg.norm(c - np.asarray(g.cov[t]))))
        (m0, c0), (m1, c1) = errs
        print(f"  {b:3d} | {m0:12.4g} | {m1:12.4g} | {c0:11.4g} | {c1:11.4g}")
