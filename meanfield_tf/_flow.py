r"""The forward flow of token measures through the continuous-depth, infinite-head transformer.

$$\frac{dX_s}{ds} = v[\nu_s, \mu_s](X_s) = \int a_\theta[\mu_s](X_s)\, d\nu_s(\theta),
\qquad \mu_s = \text{law of } X_s,$$

a McKean–Vlasov flow: every token's velocity depends on all tokens of its sequence. With the
default `diffrax.Euler()` and `FixedSteps(1)` this is exactly the finite transformer with `L`
layers of `M` heads (residual scale `1/L`, head average `1/M`).
"""

from __future__ import annotations

import diffrax
import equinox as eqx
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from ._attention import AbstractKernel, DenseKernel
from ._depth import CellArgs, integrate_depth, raise_if_failed
from ._errors import InputError, concrete_or_none
from ._heads import HeadMeasure, merged_query_key
from ._solvers import DepthSolver
from ._tokens import TokenBatch
from ._units import Block


class AttentionField(eqx.Module):
    """The vector field `v[ν_s, μ](x)` of the whole batch, as a diffrax vector field.

    Called as `field(s, x, args)` with `x` of shape `(B, n, d)` and `args` a `CellArgs` whose
    `extra` holds the token weights `(B, n)`. When the parameters hold MLP units, their velocity
    `v'` is added as `block` says: `v(x) + v'(x)` (sum) or `v(x) + v'(x + h v(x))` with
    `h = 1/(L steps_per_layer)` (sequential: explicit Euler of this field is attention then units
    in every step). Build it from a solver with `AttentionField.of(solver)`.
    """

    kernel: AbstractKernel = DenseKernel()
    block: Block = Block()
    steps_per_layer: int = eqx.field(static=True, default=1)

    @classmethod
    def of(cls, solver: DepthSolver) -> "AttentionField":
        """The field of a `DepthSolver`: its kernel and block (and Euler steps per layer)."""
        k = solver.stepping.steps_per_layer if solver.block.sequential else 1
        return cls(solver.kernel, solver.block, k)

    def __call__(self, s, x: Float[Array, "B n d"], args: CellArgs) -> Float[Array, "B n d"]:
        theta = args.params_at(s)
        v = self.kernel.velocity(x, args.extra, merged_query_key(theta), theta["V"])
        if "U" not in theta:
            return v
        if self.block.sequential:
            h = 1.0 / (args.num_layers * self.steps_per_layer)
            return v + self.block.velocity(x + h * v, theta)
        return v + self.block.velocity(x, theta)


class FlowSolution(eqx.Module):
    """Result of `flow`: final tokens `x` `(B, n, d)`, saved depths `s` `(T,)`, states `xs`
    `(T, B, n, d)`, accepted steps per layer `(L,)` and per-layer convergence flags `(L,)`."""

    x: Float[Array, "B n d"]
    s: Float[Array, " T"]
    xs: Float[Array, "T B n d"]
    num_steps: Int[Array, " L"]
    converged: Bool[Array, " L"]

    def check(self) -> "FlowSolution":
        """Raise `SolverError` (outside `jit`) if any layer's solve failed; return self."""
        raise_if_failed(self.converged)
        return self


def check_depths(depths: Float[Array, " T"]) -> None:
    """Raise `InputError` unless `depths` is 1-D and (when concrete) sorted within `[0, 1]`."""
    if depths.ndim != 1 or depths.shape[0] < 1:
        raise InputError(f"depths must be a non-empty 1-D array of depths in [0, 1], got shape "
                         f"{depths.shape}")
    dd = concrete_or_none(depths)
    if dd is not None and (not np.isfinite(dd).all() or (dd < 0).any() or (dd > 1).any()
                           or (dd[1:] < dd[:-1]).any()):
        raise InputError("depths must be sorted and lie in [0, 1]")


def check_compatible(heads: HeadMeasure, tokens: TokenBatch) -> None:
    """Raise `InputError` unless heads and tokens share dimension and dtype."""
    if heads.dim != tokens.dim:
        raise InputError(
            f"heads act on dimension d={heads.dim} but tokens live in d={tokens.dim}; "
            f"A and V must be (L, M, d, d) with the tokens' d"
        )
    if heads.dtype != tokens.x.dtype:
        raise InputError(
            f"heads are {heads.dtype} but tokens are {tokens.x.dtype}; cast one of them "
            f"(heads.astype(...) or TokenBatch(x.astype(...), w.astype(...)))"
        )


def flow(
    heads: HeadMeasure,
    tokens: TokenBatch,
    solver: DepthSolver = DepthSolver(),
    *,
    depths: Float[Array, " T"] | None = None,
    adjoint: diffrax.AbstractAdjoint = diffrax.RecursiveCheckpointAdjoint(),
) -> FlowSolution:
    """Push a batch of token measures through the transformer of head measure `heads`.

    **Arguments:**

    - `heads`: the head particles (`L` cells × `M` heads).
    - `tokens`: the batch of `B` sequences of `n` tokens in `R^d`.
    - `solver`: a `DepthSolver` (ODE method, stepping, kernel). Default: Euler with one step per
      layer and the dense kernel, i.e. the finite transformer.
    - `depths`: sorted depths in `[0, 1]` to save at; default: every layer edge `l/L`.
    - `adjoint`: how diffrax differentiates the solve (default: checkpointed autodiff).

    **Returns:** a `FlowSolution`. Call `sol.check()` (or `check_converged(sol)`) outside `jit`
    to turn a failed adaptive solve into a `SolverError`.
    """
    check_compatible(heads, tokens)
    if not isinstance(solver, DepthSolver):
        raise InputError(f"solver must be a DepthSolver(ode, stepping, kernel), got "
                         f"{type(solver).__name__}")
    if depths is not None:
        depths = jnp.asarray(depths, heads.dtype)
        check_depths(depths)
    return _flow(heads, tokens, solver, depths, adjoint)


@eqx.filter_jit
def _flow(heads, tokens, solver, depths, adjoint):
    field, ode, x0 = solver.problem(AttentionField.of(solver), tokens.x)
    sol = integrate_depth(
        field, x0, heads, solver=ode,
        stepping=solver.stepping, extra=tokens.w, depths=depths, adjoint=adjoint,
    )
    return FlowSolution(x=sol.y1, s=sol.ts, xs=sol.ys, num_steps=sol.num_steps,
                        converged=sol.converged)


def check_converged(sol: FlowSolution) -> None:
    """Raise `SolverError` (outside `jit`) if any layer's solve failed."""
    raise_if_failed(sol.converged)
