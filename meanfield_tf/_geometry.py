r"""Where the tokens live: Euclidean space (the default) or the unit sphere.

A geometry is an option object of `DepthSolver` (`DepthSolver(..., geometry=Sphere())`), never a
flag threaded through the numerics: it turns the attention field, the diffrax solver and the
input tokens of a depth solve into those of the constrained problem (`problem`).

**`Euclidean()`** leaves everything as it is: $dX/ds = v[\nu_s, \mu_s](X)$ in $\mathbb{R}^d$.

**`Sphere()`** keeps every token on the unit sphere $S^{d-1}$, the setting of the clustering
analysis of self-attention (Geshkovski, Letrouit, Polyanskiy, Rigollet):

- *finite transformer* (explicit Euler with fixed steps, `DepthSolver.finite_transformer`): each
  step is followed by a normalisation,
  $$X \leftarrow \frac{X + h\, v(X)}{|X + h\, v(X)|}$$
  (token by token; $h = 1/(Lk)$), the discrete model of that literature. The unprojected field is
  used inside the step.
- *any other solver* (continuous depth): the tangent-projected field
  $$\frac{dx}{ds} = P^\perp_x v(x) = v(x) - \frac{\langle x, v(x)\rangle}{|x|^2}\, x,$$
  which is $v - \langle x, v\rangle x$ on the sphere. It conserves $|x|$ exactly, so the tokens
  stay on the sphere up to the solver's error (no projection after steps: the drift is the
  accumulated local error, of the order of the tolerance).
- *input tokens* are projected radially, $x \mapsto x/|x|$, before the solve; a zero token
  (padding, for instance) is mapped to $e_1 = (1, 0, \dots, 0)$ (with weight 0 it affects no
  other token).

Every step is plain JAX, so reverse-mode autodiff through the solve is exact. The fused Euler
adjoint is not used in sphere mode (`Autodiff` falls back to differentiating the solve) and the
`Explicit` method refuses it: their closed forms are those of the Euclidean step.
"""

from __future__ import annotations

from typing import Callable

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float


class AbstractGeometry(eqx.Module):
    """Where the tokens live; `problem` adapts a depth solve to it."""

    def problem(
        self, field: Callable, ode: diffrax.AbstractSolver, x0: Float[Array, "B n d"], *,
        finite: bool,
    ) -> tuple[Callable, diffrax.AbstractSolver, Float[Array, "B n d"]]:
        """`(field, ode, x0)` of the constrained solve, given the unconstrained ones; `finite`
        says whether the solve is the finite transformer (Euler, fixed steps)."""
        return field, ode, x0

    @property
    def euclidean(self) -> bool:
        """True when nothing is constrained (the closed-form gradient paths apply)."""
        return False


class Euclidean(AbstractGeometry):
    """Tokens in $\\mathbb{R}^d$, unconstrained (the default)."""

    @property
    def euclidean(self) -> bool:
        return True


class Sphere(AbstractGeometry):
    """Tokens on the unit sphere $S^{d-1}$: normalised Euler steps for the finite transformer,
    the tangent-projected field for continuous-depth solvers, radially projected inputs (see the
    module docstring)."""

    def problem(self, field, ode, x0, *, finite):
        x0 = normalise(x0)
        if finite:
            return field, NormalisedSteps(ode), x0
        return TangentField(field), ode, x0


def normalise(x: Float[Array, "... d"]) -> Float[Array, "... d"]:
    r"""$x / |x|$ along the last axis; a zero vector becomes $e_1$. Safe to differentiate (the
    gradient at a zero vector is 0)."""
    sq = jnp.sum(x * x, axis=-1, keepdims=True)
    zero = sq == 0
    safe = jnp.where(zero, jnp.ones_like(x), x)
    unit = safe * jax.lax.rsqrt(jnp.sum(safe * safe, axis=-1, keepdims=True))
    e1 = jnp.zeros_like(x).at[..., 0].set(1)
    return jnp.where(zero, e1, unit)


class TangentField(eqx.Module):
    r"""The field `field(s, x, args)` projected on the tangent space of the sphere through each
    token: $v - \langle x, v\rangle x / |x|^2$ (shapes as the wrapped field, tokens on the last
    axis)."""

    field: Callable

    def __call__(self, s, x, args):
        v = self.field(s, x, args)
        return v - jnp.sum(x * v, axis=-1, keepdims=True) / jnp.sum(x * x, axis=-1,
                                                                     keepdims=True) * x


class NormalisedSteps(diffrax.AbstractWrappedSolver):
    r"""A diffrax solver whose every step is followed by $y \mapsto y/|y|$ token by token (the
    normalised finite transformer when wrapping `diffrax.Euler()`).

    Dense output between steps (saving at depths inside a step) interpolates the wrapped solver's
    dense information with the normalised end point: for Euler, the chord between two points of
    the sphere. `isinstance` checks see the wrapped solver (diffrax's wrapped-solver rule).
    """

    solver: diffrax.AbstractSolver

    @property
    def term_structure(self):
        return self.solver.term_structure

    @property
    def interpolation_cls(self):  # pyright: ignore
        return self.solver.interpolation_cls

    @property
    def term_compatible_contr_kwargs(self):
        return self.solver.term_compatible_contr_kwargs

    def order(self, terms):
        return self.solver.order(terms)

    def strong_order(self, terms):
        return self.solver.strong_order(terms)

    def error_order(self, terms):
        return self.solver.error_order(terms)

    def init(self, terms, t0, t1, y0, args):
        return self.solver.init(terms, t0, t1, y0, args)

    def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
        y1, y_error, dense_info, solver_state, result = self.solver.step(
            terms, t0, t1, y0, args, solver_state, made_jump)
        y1 = normalise(y1)
        if isinstance(dense_info, dict) and "y1" in dense_info:
            dense_info = {**dense_info, "y1": y1}
        return y1, y_error, dense_info, solver_state, result

    def func(self, terms, t0, y0, args):
        return self.solver.func(terms, t0, y0, args)
