r"""The exact Gaussian solution: moment flow of $\mu_s = N(m_s, \Sigma_s)$.

For a Gaussian token measure, $\mathrm{LSE}_\mu(z) = \langle m, z\rangle + \frac12 z^\top\Sigma z$, so a
head's velocity $a_\theta[\mu](x) = V(m + \Sigma A^\top x)$ is affine in $x$. The flow keeps
Gaussians Gaussian, with (writing $M_s = \int V \Sigma A^\top d\nu_s$)

$$\frac{dm}{ds} = \int V (m + \Sigma A^\top m)\, d\nu_s, \qquad
  \frac{d\Sigma}{ds} = M_s \Sigma + \Sigma M_s^\top.$$

This is the infinite-token limit of `flow`, exactly; it is the reference the simulator is tested
against as the number of tokens grows.

**Other attention rules.** The rule comes from the kernel: `kernel.gaussian_velocity(A, V, m, Σ)`
is the head-averaged affine velocity $v(x) = B_s x + c_s$ it induces on $N(m, \Sigma)$, and then

$$\frac{dm}{ds} = B_s m + c_s, \qquad \frac{d\Sigma}{ds} = B_s \Sigma + \Sigma B_s^\top.$$

Softmax: $B_s = M_s$, $c_s = \int V m\, d\nu_s$ (above); L2 attention and Sinkhorn attention have
their own affine laws (`_l2_attention.py`, `_sinkhorn.py`); a kernel without a Gaussian limit
(a causal mask) raises `InputError`.
"""

from __future__ import annotations

import diffrax
import equinox as eqx
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float

from ._attention import AbstractKernel, DenseKernel
from ._depth import CellArgs, FixedSteps, integrate_depth
from ._errors import InputError, check_finite, concrete_or_none
from ._heads import HeadMeasure, merged_query_key
from ._solvers import DepthSolver


class GaussianMomentField(eqx.Module):
    """`(dm/ds, dΣ/ds)` for `state = (m (d,), Σ (d, d))` under the cell's head particles, with
    the attention rule of `kernel` (a diffrax vector field `field(s, state, args)`)."""

    kernel: AbstractKernel = DenseKernel()

    def __call__(self, s, state, args: CellArgs):
        m, cov = state
        theta = args.params_at(s)
        B, c = self.kernel.gaussian_velocity(merged_query_key(theta), theta["V"], m, cov)
        return B @ m + c, B @ cov + cov @ B.T


gaussian_moment_velocity = GaussianMomentField()  # softmax attention


class GaussianFlowSolution(eqx.Module):
    """Moments of `N(m_s, Σ_s)` at the saved depths: `s` `(T,)`, `mean` `(T, d)`, `cov` `(T, d, d)`."""

    s: Float[Array, " T"]
    mean: Float[Array, "T d"]
    cov: Float[Array, "T d d"]
    converged: Bool[Array, " L"]


def gaussian_flow(
    heads: HeadMeasure,
    mean: Float[Array, " d"],
    cov: Float[Array, "d d"],
    solver: DepthSolver = DepthSolver(diffrax.Tsit5(), FixedSteps(8)),
    *,
    depths: Float[Array, " T"] | None = None,
) -> GaussianFlowSolution:
    """Solve the exact moment ODE of a Gaussian token measure through `heads`.

    `solver` is a `DepthSolver`; its kernel gives the attention rule (`kernel.gaussian_velocity`:
    any unmasked softmax kernel, `L2Kernel`, `SinkhornKernel`, their chunked forms; a causal mask
    raises `InputError`), not an implementation: the moments need no tokens.
    The default (Tsit5, 8 steps per layer) reaches about 1e-9 relative on moderate heads (4e-9
    measured where the covariance grows threefold per layer); use `AdaptiveSteps` for a
    controlled error. Note that Euler with one step per layer is **not** the
    finite transformer's Gaussian limit (that would need the discrete map); this solves the
    continuous-depth ODE.
    """
    if not solver.geometry.euclidean:
        raise InputError("gaussian_flow solves the moment ODE of Gaussian tokens in R^d; it has "
                         "no sphere geometry: use DepthSolver(geometry=Euclidean()) (the default)")
    if heads.has_units:
        raise InputError("the exact Gaussian flow holds for attention only: MLP units (a "
                         "nonlinear token map) do not keep Gaussians Gaussian; pass "
                         "heads.without_units() or simulate sampled tokens with flow")
    mean = jnp.asarray(mean, heads.dtype)
    cov = jnp.asarray(cov, heads.dtype)
    d = heads.dim
    if mean.shape != (d,) or cov.shape != (d, d):
        raise InputError(
            f"Gaussian mean/cov have shapes {mean.shape}/{cov.shape}, expected ({d},)/({d}, {d}) "
            f"to match the heads' dimension"
        )
    check_finite("Gaussian mean", mean)
    check_finite("Gaussian cov", cov)
    if not isinstance(solver, DepthSolver):
        raise InputError(f"solver must be a DepthSolver(ode, stepping, kernel), got "
                         f"{type(solver).__name__}")
    # raises for a rule without a Gaussian limit, or one that fails on the first layer
    solver.kernel.gaussian_velocity(heads.A[0], heads.V[0], mean, cov)
    sol = _gaussian_flow(heads, mean, cov, solver, depths)
    if not _finite(sol.mean) or not _finite(sol.cov):
        raise InputError(
            f"the Gaussian moment flow of {type(solver.kernel).__name__} became non-finite (for "
            f"L2 attention: the tilted precision Σ⁻¹ + 2Ã stopped being positive definite along "
            f"the flow); use heads with a positive semi-definite symmetric part or smaller scales")
    return sol


def _finite(a) -> bool:
    arr = concrete_or_none(a)
    return arr is None or bool(np.all(np.isfinite(arr)))


@eqx.filter_jit
def _gaussian_flow(heads, mean, cov, solver, depths):
    sol = integrate_depth(GaussianMomentField(solver.kernel), (mean, cov), heads,
                          solver=solver.ode, stepping=solver.stepping, depths=depths)
    return GaussianFlowSolution(s=sol.ts, mean=sol.ys[0], cov=sol.ys[1], converged=sol.converged)
