"""Command-line flags shared by the subcommands (their choices come from the name tables of
`meanfield_tf.workflow.build`, the one place names become objects)."""

from __future__ import annotations

import argparse

from ..workflow.build import DTYPES, KERNELS, PRECISIONS, SOLVERS


def add_solver_flags(parser: argparse.ArgumentParser) -> None:
    """The depth-solver flags shared by `simulate`, `grad` and friends."""
    g = parser.add_argument_group("depth solver")
    g.add_argument("--solver", default=None, choices=sorted(SOLVERS),
                   help="diffrax solver for the depth ODE (default: euler, the finite transformer)")
    g.add_argument("--steps", type=int, default=None,
                   help="total fixed steps, a multiple of L (default: L, one per layer)")
    g.add_argument("--rtol", type=float, default=None, help="adaptive steps: relative tolerance")
    g.add_argument("--atol", type=float, default=None, help="adaptive steps: absolute tolerance")
    g.add_argument("--dtype", default=None, choices=list(DTYPES),
                   help="floating-point precision (default: float32)")
    g.add_argument("--kernel", default=None, choices=list(KERNELS),
                   help="attention kernel (default: dense)")
    g.add_argument("--chunk-size", type=int, default=None,
                   help="key chunk (chunked) or query block (l2-chunked, sinkhorn-chunked, causal "
                   "chunked) of the memory-linear kernels (default 256)")
    g.add_argument("--causal", action="store_true", default=None,
                   help="causal mask: token i attends to tokens j <= i only (dense, chunked, l2, "
                   "l2-chunked)")
    g.add_argument("--sinkhorn-iterations", type=int, default=None,
                   help="row normalisations of the sinkhorn kernels (default 3; 1 is softmax)")
    g.add_argument("--precision", default=None, choices=list(PRECISIONS),
                   help="precision policy of the cudnn and pallas kernels: float32 (default), "
                   "tf32 matmuls, or bf16 scores with float32 accumulation")
    g.add_argument("--sphere", action="store_true", default=None,
                   help="tokens on the unit sphere: inputs normalised, Euler steps normalised "
                   "(finite transformer) or the field projected on the tangent space (other "
                   "solvers); see docs/sphere.md")


def solver_flags(args: argparse.Namespace) -> dict:
    """The solver flags as `SolverConfig` fields (`None`: not given)."""
    return {"name": args.solver, "steps": args.steps, "rtol": args.rtol, "atol": args.atol,
            "kernel": args.kernel, "chunk_size": args.chunk_size, "precision": args.precision,
            "sphere": args.sphere, "causal": args.causal,
            "sinkhorn_iterations": args.sinkhorn_iterations}
