r"""How depth is solved: the `DepthSolver` options object, and `ClassicalRK4`.

`DepthSolver(ode, stepping, kernel)` bundles what every depth solve needs — the diffrax ODE
method, how each layer cell is stepped, and the attention kernel — in the spirit of ott-jax's
solver objects: one object passed to `flow`, `risk_and_gradient`, `explicit_adjoint`, the NTK
functions and training, instead of a keyword triple in each. The default,
`DepthSolver(diffrax.Euler(), FixedSteps(1), DenseKernel())`, is the finite transformer
$X^{l+1} = X^l + \frac1L \frac1M \sum_m a_{\theta_{l,m}}[\mu^l](X^l)$.
"""

from __future__ import annotations

from typing import ClassVar

import diffrax
import equinox as eqx
import numpy as np

from ._attention import AbstractKernel, DenseKernel
from ._depth import AbstractStepping, FixedSteps
from ._errors import InputError
from ._geometry import AbstractGeometry, Euclidean
from ._units import Block

_RK4_TABLEAU = diffrax.ButcherTableau(
    c=np.array([0.5, 0.5, 1.0]),
    a_lower=(np.array([0.5]), np.array([0.0, 0.5]), np.array([0.0, 0.0, 1.0])),
    b_sol=np.array([1 / 6, 1 / 3, 1 / 3, 1 / 6]),
    # embedded midpoint rule (weights [0, 1, 0, 0]): a conservative, 2nd-order error estimate
    b_error=np.array([1 / 6, 1 / 3 - 1.0, 1 / 3, 1 / 6]),
)


class ClassicalRK4(diffrax.AbstractERK):
    """The classical 4th-order Runge–Kutta method (stages at 0, 1/2, 1/2, 1; weights 1/6, 1/3,
    1/3, 1/6). Meant for fixed steps; its error estimate is the embedded midpoint rule."""

    tableau: ClassVar[diffrax.ButcherTableau] = _RK4_TABLEAU
    interpolation_cls: ClassVar = diffrax.ThirdOrderHermitePolynomialInterpolation.from_k

    def order(self, terms):
        del terms
        return 4


class DepthSolver(eqx.Module):
    """How the depth ODE is solved.

    **Fields:**

    - `ode`: any diffrax ODE solver (default `diffrax.Euler()`).
    - `stepping`: `FixedSteps(k)` (k equal steps per layer cell, default 1) or
      `AdaptiveSteps(rtol, atol)` (error control; needs a solver with an error estimate).
    - `kernel`: the attention kernel, `DenseKernel()` (default, the reference) or
      `ChunkedKernel(chunk_size)` (memory linear in `n`).
    - `block`: how MLP units (if the head measure holds any) act: `Block(activation,
      composition)`, default tanh units summed with attention (`"sum"`). `"sequential"` (the
      finite block: attention, then the units, in every step) needs Euler with fixed steps.
    - `geometry`: where the tokens live, `Euclidean()` (default) or `Sphere()` (unit sphere:
      normalised Euler steps for the finite transformer, the tangent-projected field otherwise;
      see `meanfield_tf._geometry`).

    Euler with `FixedSteps(k)` is the discrete network (`finite_transformer`, exactly the
    `L`-layer transformer for `k = 1`); any other combination integrates the continuous-depth
    model. Build one from arguments or with `DepthSolver(ode=diffrax.Tsit5(),
    stepping=AdaptiveSteps(1e-8, 1e-8))`.
    """

    ode: diffrax.AbstractSolver = diffrax.Euler()
    stepping: AbstractStepping = FixedSteps(1)
    kernel: AbstractKernel = DenseKernel()
    block: Block = Block()
    geometry: AbstractGeometry = Euclidean()

    def __check_init__(self):
        if not isinstance(self.ode, diffrax.AbstractSolver):
            raise InputError(f"DepthSolver.ode must be a diffrax solver (e.g. diffrax.Euler()), "
                             f"got {type(self.ode).__name__}")
        if not isinstance(self.stepping, AbstractStepping):
            raise InputError(f"DepthSolver.stepping must be FixedSteps(k) or "
                             f"AdaptiveSteps(rtol, atol), got {type(self.stepping).__name__}")
        if not isinstance(self.kernel, AbstractKernel):
            raise InputError(f"DepthSolver.kernel must be an attention kernel (DenseKernel(), "
                             f"ChunkedKernel(c)), got {type(self.kernel).__name__}")
        if not isinstance(self.geometry, AbstractGeometry):
            raise InputError(f"DepthSolver.geometry must be Euclidean() or Sphere(), got "
                             f"{type(self.geometry).__name__}")
        self.stepping.check(self.ode)
        if not isinstance(self.block, Block):
            raise InputError(f"DepthSolver.block must be a Block(activation, composition), got "
                             f"{type(self.block).__name__}")
        if self.block.sequential and not self.finite_transformer:
            raise InputError(
                f"Block(composition='sequential') is the finite transformer block (attention, "
                f"then units, in each Euler step) and needs diffrax.Euler() with FixedSteps; got "
                f"{type(self.ode).__name__} with {type(self.stepping).__name__}. Use "
                f"composition='sum' (the same depth limit) for other solvers")

    def problem(self, field, x0):
        """`(field, ode, x0)` of the depth solve of `field` from `x0` `(B, n, d)` in this
        solver's geometry (unchanged in the Euclidean default)."""
        return self.geometry.problem(field, self.ode, x0, finite=self.finite_transformer)

    @property
    def finite_transformer(self) -> bool:
        """True for explicit Euler with fixed steps: the solve is a discrete network (the finite
        transformer for one step per layer), whose exact gradient is its discrete adjoint."""
        return isinstance(self.ode, diffrax.Euler) and isinstance(self.stepping, FixedSteps)
