"""Where names (from the CLI or a YAML config) become library objects: solvers, stepping, kernels,
dtypes. This is the one place that maps names to objects; the CLI and the run layer call it.
"""

from __future__ import annotations

import diffrax

from ._attention import ChunkedKernel, DenseKernel
from ._depth import AdaptiveSteps, FixedSteps
from ._errors import InputError
from ._solvers import ClassicalRK4

SOLVERS = {
    "euler": diffrax.Euler,
    "heun": diffrax.Heun,
    "midpoint": diffrax.Midpoint,
    "ralston": diffrax.Ralston,
    "rk4": ClassicalRK4,
    "bosh3": diffrax.Bosh3,
    "tsit5": diffrax.Tsit5,
    "dopri5": diffrax.Dopri5,
    "dopri8": diffrax.Dopri8,
}


def solver_from_name(name: str) -> diffrax.AbstractSolver:
    """A diffrax solver object from its CLI name."""
    key = name.lower()
    if key not in SOLVERS:
        raise InputError(f"unknown solver {name!r}; choose one of {sorted(SOLVERS)}")
    return SOLVERS[key]()


def stepping_from_args(num_layers: int, steps: int | None, rtol: float | None,
                       atol: float | None) -> FixedSteps | AdaptiveSteps:
    """`--steps N` (total, a multiple of L) → FixedSteps(N/L); `--rtol/--atol` → AdaptiveSteps."""
    if steps is not None and (rtol is not None or atol is not None):
        raise InputError("give either --steps (fixed steps) or --rtol/--atol (adaptive), not both")
    if rtol is not None or atol is not None:
        return AdaptiveSteps(rtol=1e-6 if rtol is None else rtol, atol=1e-8 if atol is None else atol)
    if steps is None:
        return FixedSteps(1)
    if steps < 1 or steps % num_layers:
        raise InputError(
            f"--steps {steps} is not a positive multiple of the number of layers L={num_layers}; "
            f"steps must respect the layer jumps at l/L (use e.g. --steps {num_layers * 4})"
        )
    return FixedSteps(steps // num_layers)


def kernel_from_name(name: str, chunk_size: int = 256):
    if name == "dense":
        return DenseKernel()
    if name == "chunked":
        return ChunkedKernel(chunk_size)
    raise InputError(f"unknown attention kernel {name!r}; choose 'dense' or 'chunked'")


def dtype_from_name(name: str):
    """Return the numpy dtype for `float32`/`float64`, enabling JAX's x64 mode for the latter."""
    import jax
    import numpy as np

    if name == "float64":
        jax.config.update("jax_enable_x64", True)
        return np.float64
    if name == "float32":
        return np.float32
    raise InputError(f"unknown dtype {name!r}; choose float32 or float64")
