"""Command-line flags shared by the subcommands. Names become objects in `meanfield_tf.options`
(re-exported here so subcommands import one module)."""

from __future__ import annotations

import argparse

from ..options import SOLVERS as SOLVERS
from ..options import dtype_from_name as dtype_from_name
from ..options import kernel_from_name as kernel_from_name
from ..options import solver_from_name as solver_from_name
from ..options import stepping_from_args as stepping_from_args


def add_solver_flags(parser: argparse.ArgumentParser) -> None:
    """The depth-solver flags shared by `simulate`, `grad` and friends."""
    g = parser.add_argument_group("depth solver")
    g.add_argument("--solver", default=None, choices=sorted(SOLVERS),
                   help="diffrax solver for the depth ODE (default: euler, the finite transformer)")
    g.add_argument("--steps", type=int, default=None,
                   help="total fixed steps, a multiple of L (default: L, one per layer)")
    g.add_argument("--rtol", type=float, default=None, help="adaptive steps: relative tolerance")
    g.add_argument("--atol", type=float, default=None, help="adaptive steps: absolute tolerance")
    g.add_argument("--dtype", default=None, choices=["float32", "float64"],
                   help="floating-point precision (default: float32)")
    g.add_argument("--kernel", default=None, choices=["dense", "chunked"],
                   help="attention kernel (default: dense)")
    g.add_argument("--chunk-size", type=int, default=None, help="key chunk of the chunked kernel")
