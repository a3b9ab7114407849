"""`meanfield-tf grad`: the token-regression risk and its mean-field gradient w.r.t. the heads.

Risk: R = (1/B) sum_i sum_k w_ik 1/2 |X_ik(1) - y_ik|^2. Output: an npz with `loss` (scalar) and
the mean-field gradients g = L M dR/dtheta, keyed like the heads (`A`, `V`, each (L, M, d, d);
`Q`, `K`, `V` for factored heads).
"""

from __future__ import annotations

import argparse

import numpy as np

from ..workflow.build import GRADIENT_METHODS
from . import options


def register(sub) -> None:
    p = sub.add_parser(
        "grad",
        help="risk and mean-field gradient of a token-regression target",
        description="Compute R = (1/B) sum_i sum_k w_ik 1/2 |X_ik(1) - y_ik|^2 and the mean-field "
        "gradient g = L M dR/dtheta of every head. Methods: autodiff (through the solve; exact "
        "for the finite transformer), explicit (closed-form adjoint with its non-local term; "
        "the exact discrete adjoint with Euler), backsolve (continuous adjoint; needs a solver "
        "other than constant-step Euler). Default: Euler with one step per layer, i.e. the "
        "finite transformer.",
    )
    io = p.add_argument_group("inputs and outputs")
    io.add_argument("--tokens", required=True, help="npz with x (B,n,d) and optional w (B,n)")
    io.add_argument("--heads", required=True, help="npz with A and V, each (L,M,d,d) (or Q, K, V)")
    io.add_argument("--targets", required=True, help="npz with y (B,n,d): one target per token")
    io.add_argument("--interpolation", choices=["piecewise", "linear"], default=None,
                    help="depth interpolation of --heads (linear: L+1 nodes; default: the "
                    "file's `interpolation` key, else piecewise)")
    io.add_argument("--method", choices=list(GRADIENT_METHODS), default="autodiff",
                    help="gradient method (default: autodiff)")
    io.add_argument("--out", default="grad.npz", help="output npz: loss, and A, V gradients")
    options.add_solver_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .._errors import InputError, SolverError
    from .._gradients import risk_and_gradient
    from .._risks import TokenRegression
    from ..workflow import build
    from ..workflow.config import SolverConfig
    from ..workflow.files import load_array, load_heads, load_tokens, save_npz_atomic

    dtype = build.dtype(args.dtype or "float32")
    flags = {k: v for k, v in options.solver_flags(args).items() if v is not None}
    solver_cfg = SolverConfig(**flags)
    build.warn_tolerances(solver_cfg, args.dtype or "float32")
    method = build.gradient_method(args.method)
    tokens = load_tokens(args.tokens, dtype)
    heads = load_heads(args.heads, dtype, interpolation=args.interpolation)
    B, n, d = tokens.x.shape
    y = load_array(args.targets, "y", "targets", (B, n, d), dtype)
    solver = build.depth_solver(solver_cfg, heads.num_layers)
    loss, grads = risk_and_gradient(heads, tokens, TokenRegression(y), method=method,
                                    solver=solver)
    loss = np.asarray(loss)
    out = {k: np.asarray(v) for k, v in grads.params.items()}
    if not np.isfinite(loss):
        raise SolverError(
            "the depth solve failed or overflowed (non-finite loss); raise max steps, loosen "
            "--rtol/--atol, use --steps, or reduce the head scales"
        )
    if not all(np.isfinite(v).all() for v in out.values()):
        raise InputError("the gradient is non-finite (overflow); reduce the head scales or use "
                         "--dtype float64")
    save_npz_atomic(args.out, loss=loss, **out)
    norms = ", ".join(f"|g_{k}| = {np.linalg.norm(v):.4g}" for k, v in sorted(out.items()))
    print(f"{args.method} gradient of the token-regression risk: R = {float(loss):.6g}; {norms} "
          f"(L={heads.num_layers}, M={heads.num_heads}); wrote {args.out}")
    return 0
