r"""Mean-field gradients of a risk with respect to the head particles: the gradient methods.

Every method returns the **mean-field gradient** $g_{l,m} = L\,M\,\partial R / \partial\theta_{l,m}$
as a `HeadMeasure` of the same structure as the heads (same keys, shapes and interpolation; MLP
units `U`, `W`, `b` get $L M' \partial R/\partial\theta'$, their own family's count), so
that plain gradient descent $\theta \leftarrow \theta - \tau g$ is explicit Euler of the
conditional Wasserstein gradient flow $d\theta/dt = -\nabla_\theta G(s, \theta)$. For piecewise
heads $g_{l,m}$ is the average of $\nabla_\theta G(s, \theta_{l,m})$ over the cell (exactly
$\nabla_\theta G$ at layer $l$ for the finite transformer). For **linear** interpolation the heads
are nodes and $g$ is still $L M \partial R/\partial\theta_{\text{node}}$: node $l$ collects
$L\int (1-u)\nabla G\, ds$ from cell $l$ and $L \int u \nabla G\, ds$ from cell $l-1$ (hat-function
weights), so an interior node's gradient is $\approx \nabla_\theta G$ and each end node's is
$\approx \tfrac12 \nabla_\theta G$.

A method is an `AbstractGradientMethod`: `method.risk_and_gradient(heads, tokens, risk, solver)`
computes `(R, g)`, and `method.check(solver)` refuses a combination that would not give the
gradient of the simulated model. Adding a method is one subclass.

**Which method differentiates which model:**

| method | Euler, `FixedSteps(k)` (finite transformer for k = 1) | other solvers / `AdaptiveSteps` |
|---|---|---|
| `Autodiff()` | exact gradient of the discrete network | exact gradient of the numerical solution (discretise-then-optimise) |
| `Explicit()` | exact discrete adjoint of the Euler scheme, closed forms | backward adjoint ODE solved by diffrax (optimise-then-discretise) |
| `Backsolve()` | **refused** (`InputError`): it would be $O(1/(Lk))$ wrong | continuous-model gradient (optimise-then-discretise) |

All three converge to the gradient of the continuous-depth model as the solve is refined.
`Backsolve` with constant-step Euler evaluates each backward step at its right end — at the
state $X^{l+1}$ instead of $X^l$ — so it returns neither the finite network's gradient (53% off
on a small random problem with $L = 3$; with k steps per layer, O(1/(Lk)) off) nor a
tolerance-controlled continuous one; it is therefore refused rather than returned silently
wrong. Measurements: `docs/gradients.md`.
"""

from __future__ import annotations

import abc

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from ._depth import integrate_depth
from ._errors import InputError
from ._euler_adjoint import _risk_and_gradient as _fused
from ._flow import AttentionField, check_compatible
from ._heads import HeadMeasure
from ._native_attention import native_mode
from ._risks import AbstractRisk
from ._sharding import constrain_like_heads
from ._solvers import DepthSolver
from ._tokens import TokenBatch


class AbstractGradientMethod(eqx.Module):
    """How the mean-field gradient of a risk is computed."""

    @abc.abstractmethod
    def risk_and_gradient(
        self, heads: HeadMeasure, tokens: TokenBatch, risk: AbstractRisk, solver: DepthSolver
    ) -> tuple[Float[Array, ""], HeadMeasure]:
        """`(R, g)` with `g = L M ∂R/∂θ` shaped like `heads` (NaN if a solve failed). Inputs are
        already validated by `risk_and_gradient`."""

    def check(self, solver: DepthSolver) -> None:
        """Raise `InputError` if this method cannot differentiate a solve of `solver`."""


class Autodiff(AbstractGradientMethod):
    """Reverse-mode differentiation of the solve.

    With `diffrax.Euler()` and `FixedSteps(k)` this is the exact gradient of the discrete network
    (the finite transformer for k = 1); in general, the exact gradient of the numerical solution.

    **Fields:**

    - `adjoint`: the diffrax adjoint of the solve (default: checkpointed reverse mode).
    - `fused`: for the finite transformer (Euler, fixed steps) with a kernel that allows it
      (`kernel.fused_chunks()`: dense and chunked), run reverse mode through the fused discrete
      adjoint (`meanfield_tf._euler_adjoint`: one custom-VJP layer map per step, the backward
      recomputing each score block once; memory linear in `n`) instead of diffrax's
      checkpointed loop, which re-runs every step's forward. Same gradient to rounding
      (default `True`; `False` keeps the diffrax path, the reference). Not used for tokens on
      the sphere (`geometry=Sphere()`): its step is the Euclidean one, so the diffrax path
      differentiates the normalised steps instead.
    """

    adjoint: diffrax.AbstractAdjoint = diffrax.RecursiveCheckpointAdjoint()
    fused: bool = eqx.field(static=True, default=True)

    def risk_and_gradient(self, heads, tokens, risk, solver):
        fusable = self.fused and solver.finite_transformer and solver.geometry.euclidean
        chunks = solver.kernel.fused_chunks() if fusable else None
        if chunks is not None:
            loss, grads, _ = _fused(heads.params, heads.interpolation, tokens, risk,
                                    solver.stepping.steps_per_layer, *chunks, solver.block,
                                    native_mode())
            scale = heads.mean_field_scale()
            return loss, like_heads(heads, {k: scale[k] * g for k, g in grads.items()})
        return _through_solve(heads, tokens, risk, self.adjoint, solver)


class Backsolve(AbstractGradientMethod):
    """`diffrax.BacksolveAdjoint`: solve the continuous adjoint ODE backwards, cell by cell (each
    cell with its own parameters, the state reset to the stored forward state at every cell end).

    Returns the gradient of the continuous-depth model up to the solver's error. Refused with
    constant-step Euler (see the module docstring).
    """

    adjoint: diffrax.BacksolveAdjoint = diffrax.BacksolveAdjoint()

    def check(self, solver):
        if solver.finite_transformer:
            raise InputError(
                "Backsolve with constant-step Euler does not return the gradient of the network "
                "it simulates (each backward step is evaluated at the state after the layer, an "
                "O(1/L) error); use the autodiff or explicit method (Autodiff(), Explicit()) for "
                "the exact finite-transformer gradient, or an adaptive solver (e.g. --solver "
                "tsit5 --rtol 1e-8, Tsit5 with AdaptiveSteps) for the continuous-depth gradient"
            )

    def risk_and_gradient(self, heads, tokens, risk, solver):
        return _through_solve(heads, tokens, risk, self.adjoint, solver)


def check_gradient_inputs(heads, tokens, risk, method, solver) -> None:
    """Raise `InputError` for inputs or a method/solver combination that cannot give a correct
    gradient (works with concrete or traced arrays; value checks need concrete ones)."""
    if not isinstance(heads, HeadMeasure):
        raise InputError(f"heads must be a HeadMeasure, got {type(heads).__name__}")
    if not isinstance(tokens, TokenBatch):
        raise InputError(f"tokens must be a TokenBatch, got {type(tokens).__name__}")
    if not isinstance(risk, AbstractRisk):
        raise InputError(
            f"risk must be a meanfield_tf risk (TokenRegression, QueryRegression, "
            f"QueryClassification, SinkhornRisk), got {type(risk).__name__}"
        )
    if not isinstance(method, AbstractGradientMethod):
        raise InputError(
            f"unknown gradient method {method!r}; use Autodiff(), Backsolve() or Explicit()"
        )
    if not isinstance(solver, DepthSolver):
        raise InputError(f"solver must be a DepthSolver(ode, stepping, kernel), got "
                         f"{type(solver).__name__}")
    check_compatible(heads, tokens)
    risk.validate(tokens)
    method.check(solver)


def risk_and_gradient(
    heads: HeadMeasure,
    tokens: TokenBatch,
    risk: AbstractRisk,
    *,
    method: AbstractGradientMethod = Autodiff(),
    solver: DepthSolver = DepthSolver(),
) -> tuple[Float[Array, ""], HeadMeasure]:
    r"""The risk $R = \frac1B\sum_i J_i(X^i_1)$ and its mean-field gradient
    $g_{l,m} = L M\, \partial R / \partial\theta_{l,m}$.

    **Arguments:**

    - `heads`: the head particles; `tokens`: the batch; `risk`: an `AbstractRisk`.
    - `method`: `Autodiff()` (default), `Backsolve()` or `Explicit()` — see the module docstring
      for which model each one differentiates.
    - `solver`: a `DepthSolver`, as in `flow` (default: the finite transformer).

    **Returns:** `(loss, grads)` with `grads` a `HeadMeasure` shaped like `heads`. If an adaptive
    solve fails (max steps), both are NaN. Jit-friendly: wrap it in `eqx.filter_jit`, or call it
    as is (it is jitted inside); the validation runs on shapes when traced.
    """
    check_gradient_inputs(heads, tokens, risk, method, solver)
    return method.risk_and_gradient(heads, tokens, risk, solver)


def nan_if(bad, tree):
    """Every leaf of `tree` replaced by NaN where `bad` (a failed solve)."""
    return jax.tree.map(lambda a: jnp.where(bad, jnp.nan, a), tree)


def like_heads(heads: HeadMeasure, params: dict[str, Array]) -> HeadMeasure:
    """`params` as a `HeadMeasure` with the interpolation of `heads` (no validation), sharded
    like the heads when they live on a device mesh."""
    params = constrain_like_heads(params, heads)
    return HeadMeasure(**params, interpolation=heads.interpolation, check=False)


@eqx.filter_jit
def _through_solve(heads, tokens, risk, adjoint, solver):
    def loss_fn(params):
        h = eqx.tree_at(lambda t: t.params, heads, params)
        field, ode, x0 = solver.problem(AttentionField.of(solver), tokens.x)
        sol = integrate_depth(field, x0, h, solver=ode, stepping=solver.stepping,
                              extra=tokens.w, adjoint=adjoint)
        return risk(sol.y1, tokens.w), sol.converged

    (loss, ok), grads = jax.value_and_grad(loss_fn, has_aux=True)(heads.params)
    scale = heads.mean_field_scale()
    grads = {k: scale[k] * g for k, g in grads.items()}
    bad = ~jnp.all(ok)
    return nan_if(bad, loss), like_heads(heads, nan_if(bad, grads))
