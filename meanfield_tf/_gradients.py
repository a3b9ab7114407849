r"""Mean-field gradients of a risk with respect to the head particles: three methods.

All three return the **mean-field gradient** $g_{l,m} = L\,M\,\partial R / \partial\theta_{l,m}$ as a
`HeadMeasure` of the same structure as the heads (same keys, shapes and interpolation), so that
plain gradient descent $\theta \leftarrow \theta - \tau g$ is explicit Euler of the conditional
Wasserstein gradient flow $d\theta/dt = -\nabla_\theta G(s, \theta)$ (DESIGN.md §2). For piecewise
heads $g_{l,m}$ is the average of $\nabla_\theta G(s, \theta_{l,m})$ over the cell (exactly
$\nabla_\theta G$ at layer $l$ for the finite transformer). For **linear** interpolation the heads
are nodes and $g$ is still $L M \partial R/\partial\theta_{\text{node}}$: node $l$ collects
$L\int (1-u)\nabla G\, ds$ from cell $l$ and $L \int u \nabla G\, ds$ from cell $l-1$ (hat-function
weights), so an interior node's gradient is $\approx \nabla_\theta G$ and each end node's is
$\approx \tfrac12 \nabla_\theta G$.

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

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from ._adjoint import adjoint_and_gradient
from ._attention import AttentionKernel, DenseKernel
from ._depth import AdaptiveSteps, CellArgs, FixedSteps, Stepping, cell_edges, integrate_depth
from ._errors import InputError
from ._flow import AttentionField, check_compatible
from ._heads import HeadMeasure
from ._risks import AbstractRisk
from ._sharding import constrain_like_heads
from ._tokens import TokenBatch


class Autodiff(eqx.Module):
    """Differentiate through the solve with a diffrax adjoint (default: checkpointed reverse mode).

    With `diffrax.Euler()` and `FixedSteps(1)` this is the exact gradient of the finite
    transformer; in general, the exact gradient of the numerical solution.
    """

    adjoint: diffrax.AbstractAdjoint = diffrax.RecursiveCheckpointAdjoint()


class Backsolve(eqx.Module):
    """`diffrax.BacksolveAdjoint`: solve the continuous adjoint ODE backwards, cell by cell (each
    cell with its own parameters, the state reset to the stored forward state at every cell end).

    Returns the gradient of the continuous-depth model up to the solver's error. Refused with
    constant-step Euler (see the module docstring).
    """

    adjoint: diffrax.BacksolveAdjoint = diffrax.BacksolveAdjoint()


class Explicit(eqx.Module):
    r"""The paper's construction: backward adjoint dynamics with local and non-local terms in
    closed form (`adjoint_velocity`), gradients from the closed-form field (`gradient_field`).

    Euler with `FixedSteps(k)`: the exact discrete adjoint of the Euler scheme,
    $\lambda_j = \lambda_{j+1} + h\,(\partial v/\partial X)(X_j)^\top \lambda_{j+1}$ at the stored
    states. Other solvers: the continuous backward ODE integrated by diffrax with the same solver
    and stepping. `nonlocal_term=False` drops the key/value term — for demonstrating that it is
    needed only; the resulting gradient is wrong.
    """

    nonlocal_term: bool = eqx.field(static=True, default=True)


GradientMethod = Autodiff | Backsolve | Explicit


class AdjointSolution(eqx.Module):
    r"""Result of `explicit_adjoint`.

    - `loss`: the risk `()`; `grads`: mean-field gradients (a `HeadMeasure`).
    - `s`: the cell edges `(L + 1,)`; `states`: forward states $X_{s}$ there `(L + 1, B, n, d)`;
      `adjoints`: positional adjoints $\lambda_s$ there `(L + 1, B, n, d)`.
    - `discrete`: `True` for the Euler discrete adjoint. Then, for `FixedSteps(1)`, layer `l`'s
      gradient field is `gradient_field(states[l], w, adjoints[l + 1], θ)` (Euler pairs the
      state at the start of a step with the adjoint at its end); otherwise `states[l]` pairs
      with `adjoints[l]` (both at depth `s[l]`).
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


def _is_discrete_euler(solver, stepping) -> bool:
    return isinstance(solver, diffrax.Euler) and isinstance(stepping, FixedSteps)


def check_gradient_options(heads, tokens, risk, method, solver, stepping) -> None:
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
    if not isinstance(method, (Autodiff, Backsolve, Explicit)):
        raise InputError(
            f"unknown gradient method {method!r}; use Autodiff(), Backsolve() or Explicit()"
        )
    if not isinstance(stepping, (FixedSteps, AdaptiveSteps)):
        raise InputError(
            f"stepping must be FixedSteps(k) or AdaptiveSteps(rtol, atol), got {stepping!r}"
        )
    check_compatible(heads, tokens)
    risk.validate(tokens)
    if isinstance(method, Backsolve) and _is_discrete_euler(solver, stepping):
        raise InputError(
            "Backsolve with constant-step Euler does not return the gradient of the network it "
            "simulates (each backward step is evaluated at the state after the layer, an O(1/L) "
            "error); use the autodiff or explicit method (Autodiff(), Explicit()) for the exact "
            "finite-transformer gradient, or an adaptive solver (e.g. --solver tsit5 --rtol 1e-8, "
            "Tsit5 with AdaptiveSteps) for the continuous-depth gradient"
        )
    probe_term = diffrax.ODETerm(lambda t, y, a: y)
    if isinstance(stepping, AdaptiveSteps) and solver.order(probe_term) is None:
        raise InputError(f"{type(solver).__name__} has no error estimate; use FixedSteps")


def risk_and_gradient(
    heads: HeadMeasure,
    tokens: TokenBatch,
    risk: AbstractRisk,
    *,
    method: GradientMethod = Autodiff(),
    solver: diffrax.AbstractSolver = diffrax.Euler(),
    stepping: Stepping = FixedSteps(1),
    kernel: AttentionKernel = DenseKernel(),
) -> tuple[Float[Array, ""], HeadMeasure]:
    r"""The risk $R = \frac1B\sum_i J_i(X^i_1)$ and its mean-field gradient
    $g_{l,m} = L M\, \partial R / \partial\theta_{l,m}$.

    **Arguments:**

    - `heads`: the head particles; `tokens`: the batch; `risk`: an `AbstractRisk`.
    - `method`: `Autodiff()` (default), `Backsolve()` or `Explicit()` — see the module docstring
      for which model each one differentiates.
    - `solver`, `stepping`, `kernel`: as in `flow` (default: the finite transformer).

    **Returns:** `(loss, grads)` with `grads` a `HeadMeasure` shaped like `heads`. If an adaptive
    solve fails (max steps), both are NaN. Jit-friendly: wrap it in `eqx.filter_jit`, or call it
    as is (it is jitted inside); the validation runs on shapes when traced.
    """
    check_gradient_options(heads, tokens, risk, method, solver, stepping)
    if isinstance(method, Explicit):
        sol = _explicit(heads, tokens, risk, solver, stepping, kernel, method.nonlocal_term)
        return sol.loss, sol.grads
    return _through_solve(heads, tokens, risk, method.adjoint, solver, stepping, kernel)


def explicit_adjoint(
    heads: HeadMeasure,
    tokens: TokenBatch,
    risk: AbstractRisk,
    *,
    solver: diffrax.AbstractSolver = diffrax.Euler(),
    stepping: Stepping = FixedSteps(1),
    kernel: AttentionKernel = DenseKernel(),
    nonlocal_term: bool = True,
) -> AdjointSolution:
    """The `Explicit()` method with everything it computes: forward states and adjoints at every
    cell edge (feed them to `gradient_field` to evaluate ∇_θ G at any θ), loss and gradients."""
    method = Explicit(nonlocal_term)
    check_gradient_options(heads, tokens, risk, method, solver, stepping)
    return _explicit(heads, tokens, risk, solver, stepping, kernel, nonlocal_term)


def _nan_if(bad, tree):
    return jax.tree.map(lambda a: jnp.where(bad, jnp.nan, a), tree)


def _like(heads: HeadMeasure, params: dict[str, Array]) -> HeadMeasure:
    params = constrain_like_heads(params, heads)  # on a mesh: g sharded like the heads
    return HeadMeasure(**params, interpolation=heads.interpolation, check=False)


@eqx.filter_jit
def _through_solve(heads, tokens, risk, adjoint, solver, stepping, kernel):
    def loss_fn(params):
        h = eqx.tree_at(lambda t: t.params, heads, params)
        sol = integrate_depth(AttentionField(kernel), tokens.x, h, solver=solver,
                              stepping=stepping, extra=tokens.w, adjoint=adjoint)
        return risk(sol.y1, tokens.w), sol.converged

    (loss, ok), grads = jax.value_and_grad(loss_fn, has_aux=True)(heads.params)
    scale = heads.num_layers * heads.num_heads
    grads = {k: scale * g for k, g in grads.items()}
    bad = ~jnp.all(ok)
    return _nan_if(bad, loss), _like(heads, _nan_if(bad, grads))


@eqx.filter_jit
def _explicit(heads, tokens, risk, solver, stepping, kernel, nonlocal_term):
    field = AttentionField(kernel)
    w = tokens.w
    fwd = integrate_depth(field, tokens.x, heads, solver=solver, stepping=stepping, extra=w)
    loss = risk(fwd.y1, w)
    lam1 = risk.terminal_adjoint(fwd.y1, w)
    L = heads.num_layers
    s0s, s1s = cell_edges(L, heads.dtype)
    left, right = heads.cells()
    piecewise = heads.interpolation == "piecewise"
    cell_inputs = (fwd.ys[:-1], fwd.ys[1:], left, right, s0s, s1s)
    if _is_discrete_euler(solver, stepping):
        step = _discrete_cell(field, w, L, stepping.steps_per_layer, piecewise, nonlocal_term)
        discrete = True
    else:
        step = _continuous_cell(field, w, L, solver, stepping, piecewise, nonlocal_term)
        discrete = False
    lam0, (lams, gL, gR, ok) = jax.lax.scan(step, lam1, cell_inputs, reverse=True)
    if piecewise:
        grads = gL
    else:  # node l collects the left-end weight of cell l and the right-end weight of cell l-1
        grads = jax.tree.map(
            lambda a, b: jnp.concatenate([a, jnp.zeros_like(a[:1])])
            + jnp.concatenate([jnp.zeros_like(b[:1]), b]), gL, gR)
    bad = ~(jnp.all(ok) & jnp.all(fwd.converged))
    return AdjointSolution(
        loss=_nan_if(bad, loss), grads=_like(heads, _nan_if(bad, grads)),
        s=jnp.concatenate([s0s[:1], s1s]), states=fwd.ys,
        adjoints=jnp.concatenate([lams, lam1[None]]), converged=~bad, discrete=discrete,
    )


def _discrete_cell(field, w, L, k, piecewise, nonlocal_term):
    """One cell of the discrete adjoint of `k` Euler steps (scanned over cells in reverse)."""

    def cell(lam, inputs):
        x0, _, lp, rp, s0, s1 = inputs
        args = CellArgs(lp, None if piecewise else rp, s0, L, w)
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
            theta = args.params_at(s)
            x = xsub[j]
            # ∂R/∂θ_j = (h/M) ∇G(X_j, λ_{j+1}, θ_j)
            # λ_j = λ_{j+1} + h (∂v/∂X)(X_j)^T λ_{j+1}
            adj, gf = adjoint_and_gradient(x, w, lam, theta, nonlocal_term=nonlocal_term)
            u = jnp.zeros((), x.dtype) if piecewise else (s - s0) * L
            gl = jax.tree.map(lambda a, g: a + (L * h) * (1 - u) * g, gl, gf)
            gr = jax.tree.map(lambda a, g: a + (L * h) * u * g, gr, gf)
            lam = lam + h * adj
            return (lam, gl, gr), None

        zeros = jax.tree.map(jnp.zeros_like, lp)
        (lam, gl, gr), _ = jax.lax.scan(backward, (lam, zeros, zeros), jnp.arange(k), reverse=True)
        return lam, (lam, gl, gr, jnp.array(True))

    return cell


def _continuous_cell(field, w, L, solver, stepping, piecewise, nonlocal_term):
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
        u = jnp.zeros((), x.dtype) if piecewise else (s - args.s0) * L
        dgl = jax.tree.map(lambda g: -L * (1 - u) * g, gf)
        dgr = jax.tree.map(lambda g: -L * u * g, gf)
        return field(s, x, args), -adj, dgl, dgr

    term = diffrax.ODETerm(vector_field)
    if isinstance(stepping, FixedSteps):
        controller, k = diffrax.ConstantStepSize(), stepping.steps_per_layer
        max_steps = k + 1
    else:
        controller = diffrax.PIDController(rtol=stepping.rtol, atol=stepping.atol)
        k, max_steps = 1, stepping.max_steps_per_layer

    def cell(lam, inputs):
        _, x1, lp, rp, s0, s1 = inputs
        args = CellArgs(lp, None if piecewise else rp, s0, L, w)
        zeros = jax.tree.map(jnp.zeros_like, lp)
        sol = diffrax.diffeqsolve(
            term, solver, s1, s0, -(s1 - s0) / k, (x1, lam, zeros, zeros), args,
            saveat=diffrax.SaveAt(t1=True), stepsize_controller=controller,
            max_steps=max_steps, throw=False,
        )
        _, lam0, gl, gr = jax.tree.map(lambda a: a[-1], sol.ys)
        ok = sol.result == diffrax.RESULTS.successful
        return lam0, (lam0, gl, gr, ok)

    return cell
