r"""The paper's explicit gradient: backward adjoint dynamics with local and non-local terms.

`Explicit()` computes the forward states, then integrates the adjoint backwards cell by cell with
the closed forms of `_adjoint.py` — the local term $D_x v^\top \lambda$ and the non-local
(key/value) term — and reads the gradient off the closed-form field $\nabla_\theta G(s, \theta)$:

- Euler with `FixedSteps(k)`: the exact discrete adjoint of the Euler scheme,
  $\lambda_j = \lambda_{j+1} + h\,(\partial v/\partial X)(X_j)^\top \lambda_{j+1}$ at the states of
  the forward pass (equal to `Autodiff()` to rounding). With a memory-linear kernel
  (`ChunkedKernel`) the closed forms are evaluated block by block over the scores, memory linear
  in `n`; with the dense kernel they form the `(M, n, n)` softmax;
- any other solver: the continuous backward ODE, integrated by diffrax with the same solver and
  stepping, from the stored forward state at every cell end (optimise-then-discretise).

MLP units (`_units.py`) add their local term $(\partial v'/\partial X)^\top\lambda$ to the adjoint
(no non-local term: a unit acts on each token alone) and their closed-form gradient field. With
`Block(composition="sequential")` each Euler step is attention then units, and its discrete
adjoint goes back through the units first (at the intermediate state $Y = X + h v(X)$), then
through attention.

`explicit_adjoint` returns everything it computes (states and adjoints at every cell edge), so
that `gradient_field` can evaluate $\nabla_\theta G$ at any $\theta$, not only at the particles.
"""

from __future__ import annotations

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from ._adjoint import adjoint_and_gradient
from ._errors import InputError
from ._euler_adjoint import chunked_adjoint_and_gradient
from ._depth import CellArgs, cells, integrate_depth, solve_cell
from ._errors import InputError
from ._flow import AttentionField
from ._gradients import AbstractGradientMethod, check_gradient_inputs, like_heads, nan_if
from ._heads import HeadMeasure, merged_query_key
from ._risks import AbstractRisk
from ._solvers import DepthSolver
from ._tokens import TokenBatch
from ._units import unit_params


class Explicit(AbstractGradientMethod):
    r"""The paper's construction: backward adjoint dynamics with local and non-local terms in
    closed form (`adjoint_velocity`), gradients from the closed-form field (`gradient_field`).

    `nonlocal_term=False` drops the key/value term — for demonstrating that it is needed only;
    the resulting gradient is wrong.
    """

    nonlocal_term: bool = eqx.field(static=True, default=True)

    def check(self, solver):
        if not solver.geometry.euclidean:
            raise InputError(
                "Explicit() evaluates the closed-form adjoint of the Euclidean flow, not of the "
                "normalised or tangent-projected flow on the sphere; use Autodiff() (exact "
                "gradient of the solve) with geometry=Sphere()")
        if not solver.kernel.plain_softmax():
            raise InputError(
                f"the explicit method's closed forms are those of plain softmax attention; the "
                f"{type(solver.kernel).__name__} kernel computes another rule (causal mask, L2 or "
                f"Sinkhorn): use the autodiff method (Autodiff(), --method autodiff), which "
                f"differentiates the kernel itself")

    def risk_and_gradient(self, heads, tokens, risk, solver):
        sol = _explicit(heads, tokens, risk, solver, self.nonlocal_term)
        return sol.loss, sol.grads


class AdjointSolution(eqx.Module):
    r"""Result of `explicit_adjoint`.

    - `loss`: the risk `()`; `grads`: mean-field gradients (a `HeadMeasure`).
    - `s`: the cell edges `(L + 1,)`; `states`: forward states $X_{s}$ there `(L + 1, B, n, d)`;
      `adjoints`: positional adjoints $\lambda_s$ there `(L + 1, B, n, d)`.
    - `discrete`: `True` for the Euler discrete adjoint. Then, for `FixedSteps(1)`, layer `l`'s
      gradient field is `gradient_field(states[l], w, adjoints[l + 1], θ)` (Euler pairs the
      state at the start of a step with the adjoint at its end); otherwise `states[l]` pairs
      with `adjoints[l]` (both at depth `s[l]`). `gradient_field` covers the heads; for MLP units
      the field is `solver.block.adjoint_and_gradient(states, adjoints, units)[1]` (for the
      sequential block at the state after the layer's attention update).
    - `converged`: `False` if any forward or backward cell solve failed (then `loss` and `grads`
      are NaN).
    """

    loss: Float[Array, ""]
    grads: HeadMeasure
    s: Float[Array, " T"]
    states: Float[Array, "T B n d"]
    adjoints: Float[Array, "T B n d"]
    converged: Array
    discrete: bool = eqx.field(static=True)


def explicit_adjoint(
    heads: HeadMeasure,
    tokens: TokenBatch,
    risk: AbstractRisk,
    *,
    solver: DepthSolver = DepthSolver(),
    nonlocal_term: bool = True,
) -> AdjointSolution:
    """The `Explicit()` method with everything it computes: forward states and adjoints at every
    cell edge (feed them to `gradient_field` to evaluate ∇_θ G at any θ), loss and gradients."""
    check_gradient_inputs(heads, tokens, risk, Explicit(nonlocal_term), solver)
    return _explicit(heads, tokens, risk, solver, nonlocal_term)


@eqx.filter_jit
def _explicit(heads, tokens, risk, solver, nonlocal_term):
    field = AttentionField.of(solver)
    w = tokens.w
    fwd = integrate_depth(field, tokens.x, heads, solver=solver.ode, stepping=solver.stepping,
                          extra=w)
    loss = risk(fwd.y1, w)
    lam1 = risk.terminal_adjoint(fwd.y1, w)
    L = heads.num_layers
    left, right, s0s, s1s = cells(heads)
    cell_inputs = (fwd.ys[:-1], fwd.ys[1:], left, right, s0s, s1s)
    piecewise = right is None
    if solver.finite_transformer:
        step = _discrete_cell(field, w, L, solver.stepping.steps_per_layer, piecewise,
                              _step_adjoint(solver, nonlocal_term))
    else:
        step = _continuous_cell(field, w, L, solver, piecewise, nonlocal_term)
    lam0, (lams, gL, gR, ok) = jax.lax.scan(step, lam1, cell_inputs, reverse=True)
    if piecewise:
        grads = gL
    else:  # node l collects the left-end weight of cell l and the right-end weight of cell l-1
        grads = jax.tree.map(
            lambda a, b: jnp.concatenate([a, jnp.zeros_like(a[:1])])
            + jnp.concatenate([jnp.zeros_like(b[:1]), b]), gL, gR)
    bad = ~(jnp.all(ok) & jnp.all(fwd.converged))
    return AdjointSolution(
        loss=nan_if(bad, loss), grads=like_heads(heads, nan_if(bad, grads)),
        s=jnp.concatenate([s0s[:1], s1s]), states=fwd.ys,
        adjoints=jnp.concatenate([lams, lam1[None]]), converged=~bad,
        discrete=solver.finite_transformer,
    )


def _accumulate(gl, gr, gf, weight, u):
    """Add `weight (1 - u) gf` to the left-end and `weight u gf` to the right-end gradients."""
    gl = jax.tree.map(lambda a, g: a + weight * (1 - u) * g, gl, gf)
    gr = jax.tree.map(lambda a, g: a + weight * u * g, gr, gf)
    return gl, gr


def _closed_forms(kernel, nonlocal_term: bool):
    """`(x, w, λ, θ) -> (adjoint velocity, gradient field)`: with a memory-linear kernel, the
    chunked pass over score blocks (memory linear in `n`); otherwise (and to drop the non-local
    term) the dense closed forms of `_adjoint.py`."""
    chunks = kernel.fused_chunks()
    if kernel.memory_linear and chunks is not None and nonlocal_term:
        return lambda x, w, lam, theta: chunked_adjoint_and_gradient(
            x, w, lam, theta, chunk_size=chunks[0], block_rows=chunks[1])
    return lambda x, w, lam, theta: adjoint_and_gradient(x, w, lam, theta,
                                                         nonlocal_term=nonlocal_term)


def _step_adjoint(solver, nonlocal_term: bool):
    r"""`(X_j, w, λ_{j+1}, θ, h) -> (λ_j, ∇_θ G)`: the discrete adjoint of one Euler step of the
    block (attention closed forms from `_closed_forms`, units from `Block.adjoint_and_gradient`).

    Sum: $\lambda_j = \lambda_{j+1} + h (\partial (v + v')/\partial X)^\top \lambda_{j+1}$ at
    $X_j$. Sequential ($Y = X_j + h v(X_j)$): $\lambda_Y = \lambda_{j+1} + h (\partial v'/\partial
    X)(Y)^\top \lambda_{j+1}$, unit gradients at $(Y, \lambda_{j+1})$, then
    $\lambda_j = \lambda_Y + h (\partial v/\partial X)(X_j)^\top \lambda_Y$, head gradients at
    $(X_j, \lambda_Y)$."""
    attention = _closed_forms(solver.kernel, nonlocal_term)
    block = solver.block

    def back(x, w, lam, theta, h):
        units = unit_params(theta)
        if not units:
            adj, g = attention(x, w, lam, theta)
            return lam + h * adj, g
        if block.sequential:
            y = x + h * solver.kernel.velocity(x, w, merged_query_key(theta), theta["V"])
            adj_u, g_u = block.adjoint_and_gradient(y, lam, units)
            lam = lam + h * adj_u
            adj, g = attention(x, w, lam, theta)
            return lam + h * adj, {**g, **g_u}
        adj, g = attention(x, w, lam, theta)
        adj_u, g_u = block.adjoint_and_gradient(x, lam, units)
        return lam + h * (adj + adj_u), {**g, **g_u}

    return back


def _discrete_cell(field, w, L, k, piecewise, step_adjoint):
    """One cell of the discrete adjoint of `k` Euler steps (scanned over cells in reverse)."""

    def cell(lam, inputs):
        x0, _, lp, rp, s0, s1 = inputs
        args = CellArgs(lp, rp, s0, L, w)
        h = (s1 - s0) / k

        def forward(x, j):  # recompute the k Euler substeps of this cell from the stored X^l
            return x + h * field(s0 + j * h, x, args), x

        if k == 1:  # the finite transformer: the stored state is the only one
            xsub = x0[None]
        else:
            _, xsub = jax.lax.scan(forward, x0, jnp.arange(k))

        def backward(carry, j):
            lam, gl, gr = carry
            s = s0 + j * h
            # ∂R/∂θ_j = (h/M) ∇G(X_j, λ_{j+1}, θ_j);  λ_j = λ_{j+1} + h (∂v/∂X)(X_j)^T λ_{j+1}
            lam_prev, gf = step_adjoint(xsub[j], w, lam, args.params_at(s), h)
            u = jnp.zeros((), lam.dtype) if piecewise else (s - s0) * L
            gl, gr = _accumulate(gl, gr, gf, L * h, u)
            return (lam_prev, gl, gr), None

        zeros = jax.tree.map(jnp.zeros_like, lp)
        (lam, gl, gr), _ = jax.lax.scan(backward, (lam, zeros, zeros), jnp.arange(k), reverse=True)
        return lam, (lam, gl, gr, jnp.array(True))

    return cell


def _continuous_cell(field, w, L, solver, piecewise, nonlocal_term):
    r"""One cell of the continuous adjoint: integrate backwards from $s_{l+1}$ to $s_l$

    $$\dot X = v,\quad \dot\lambda = -(\partial v/\partial X)^\top\lambda,\quad
      \dot g_{\text{left}} = -L(1-u)\nabla_\theta G,\quad
      \dot g_{\text{right}} = -L u \nabla_\theta G,$$

    starting from the stored forward state $X_{s_{l+1}}$ (so state errors do not accumulate across
    cells), $u = (s - s_l) L$ (piecewise heads: $u = 0$).
    """

    def vector_field(s, y, args):
        x, lam, _, _ = y
        theta = args.params_at(s)
        adj, gf = adjoint_and_gradient(x, args.extra, lam, theta, nonlocal_term=nonlocal_term)
        units = unit_params(theta)
        if units:  # composition "sum": the only one a continuous solve allows
            adj_u, g_u = solver.block.adjoint_and_gradient(x, lam, units)
            adj, gf = adj + adj_u, {**gf, **g_u}
        u = jnp.zeros((), x.dtype) if piecewise else (s - args.s0) * L
        zeros = jax.tree.map(jnp.zeros_like, gf)
        dgl, dgr = _accumulate(zeros, zeros, gf, -L, u)
        return field(s, x, args), -adj, dgl, dgr

    term = diffrax.ODETerm(vector_field)

    def cell(lam, inputs):
        _, x1, lp, rp, s0, s1 = inputs
        args = CellArgs(lp, rp, s0, L, w)
        zeros = jax.tree.map(jnp.zeros_like, lp)
        sol = solve_cell(term, solver.ode, solver.stepping, s1, s0, (x1, lam, zeros, zeros), args,
                         saveat=diffrax.SaveAt(t1=True))
        _, lam0, gl, gr = jax.tree.map(lambda a: a[-1], sol.ys)
        ok = sol.result == diffrax.RESULTS.successful
        return lam0, (lam0, gl, gr, ok)

    return cell
