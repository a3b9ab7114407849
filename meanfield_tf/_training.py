r"""Training: the conditional Wasserstein gradient flow of the head measure, driven by optax.

The heads $\nu = \int \delta_s \otimes \nu_s\, ds$ move in $\theta$ only, never in depth:

$$\frac{d\theta}{dt} = -\nabla_\theta G(s, \theta), \qquad G = \frac{\delta R}{\delta \nu}.$$

On the finite model ($L$ cells of $M$ particles) $\partial R / \partial \theta_{l,m} =
\frac{1}{LM} \nabla_\theta G(s_l, \theta_{l,m})$, so the **mean-field gradient** is
$g_{l,m} = L M\, \partial R / \partial \theta_{l,m}$. The $L \cdot M$ rescaling is done in the
gradient function (`MeanFieldGradient`, which calls the project's gradient methods in
`meanfield_tf._gradients`), never inside the optimiser: the optimiser only ever sees $g$.

Plain gradient descent $\theta \leftarrow \theta - \tau g$ is explicit Euler of the flow in training
time with step $\tau$; that is `gradient_flow_optimizer(tau)` with no `base`. Along the flow the risk
decreases at rate

$$\frac{dR}{dt} = -\|g\|^2_{L^2(\nu)} = -\frac{1}{LM} \sum_{l,m} |g_{l,m}|^2,$$

and `grad_norm` below is that $L^2(\nu)$ norm. A momentum (`optax.trace`) or Adam
(`optax.scale_by_adam`) `base` **leaves the gradient-flow geometry**: the particles then no longer
follow $-\nabla_\theta G$ (heavy-ball dynamics, or a per-coordinate rescaled metric).

The learning rate is an injected hyperparameter (`optax.inject_hyperparams`): it lives in the
optimiser state as an array, so changing it does not recompile the training step. A schedule
multiplies it by a shape `schedule(count)` that is part of the compiled step.

The training step is a pure function `step(heads, opt_state, batch) -> (heads, opt_state, info)`
so that it can be jitted, checkpointed, and sharded over the head axis.
"""

from __future__ import annotations

from typing import Any, Callable

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Float, PyTree

from ._attention import DenseKernel
from ._depth import FixedSteps
from ._errors import MeanFieldError
from ._gradients import Autodiff, risk_and_gradient
from ._heads import HeadMeasure
from ._sharding import constrain_like_heads


class TrainingDiverged(MeanFieldError):
    """The loss or the gradient became NaN or infinite during training."""


# ---------------------------------------------------------------------------------------------
# Optimiser


def gradient_flow_optimizer(
    learning_rate: float | Array,
    *,
    base: optax.GradientTransformation | None = None,
    schedule: Callable[[Array], Array] | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""The optimiser that moves the head particles along the mean-field gradients $g$.

    `update = -learning_rate * schedule(count) * base(g)`.

    **Arguments:**

    - `learning_rate`: the training-time step $\tau$ (an injected hyperparameter: an array in the
      optimiser state, `opt_state.hyperparams["learning_rate"]`; change it with
      `set_learning_rate` without recompiling).
    - `base`: `None` (default) is plain gradient descent, i.e. explicit Euler of the conditional
      Wasserstein gradient flow in training time. `optax.trace(decay=0.9)` (momentum) or
      `optax.scale_by_adam()` are options that **leave the gradient-flow geometry**.
    - `schedule`: an optax schedule shape `count -> factor` (e.g. `optax.cosine_decay_schedule(1.0,
      steps)`), multiplied into the step; `None` is constant.

    **Returns:** an optax `GradientTransformation` (with `inject_hyperparams` state).
    """

    def factory(learning_rate):
        parts = [] if base is None else [base]
        if schedule is not None:
            parts.append(optax.scale_by_schedule(schedule))
        parts.append(optax.scale(-learning_rate))
        return optax.chain(*parts)

    return optax.inject_hyperparams(factory)(learning_rate=learning_rate)


def set_learning_rate(opt_state, learning_rate) -> Any:
    """The same optimiser state with a new injected learning rate (same dtype: no recompile)."""
    old = opt_state.hyperparams["learning_rate"]
    new = dict(opt_state.hyperparams)
    new["learning_rate"] = jnp.asarray(learning_rate, old.dtype)
    return opt_state._replace(hyperparams=new)


def learning_rate_of(opt_state) -> Array:
    return opt_state.hyperparams["learning_rate"]


# ---------------------------------------------------------------------------------------------
# Mean-field gradients


class MeanFieldGradient(eqx.Module):
    r"""`(heads, batch) -> (R, g)`: the risk of a `Batch` and the mean-field gradient
    $g = L M \nabla_\theta R$ (a params dict), from `meanfield_tf._gradients.risk_and_gradient`.

    **Fields:** `method` (`Autodiff()` default: with Euler and one step per layer, the exact
    gradient of the finite transformer; `Explicit()`; `Backsolve()`), and the depth solve
    `solver`, `stepping`, `kernel` as in `flow`.
    """

    method: Any = Autodiff()
    solver: diffrax.AbstractSolver = diffrax.Euler()
    stepping: Any = FixedSteps(1)
    kernel: Any = DenseKernel()

    def __call__(self, heads: HeadMeasure, batch) -> tuple[Array, dict[str, Array]]:
        loss, g = risk_and_gradient(heads, batch.tokens, batch.risk, method=self.method,
                                    solver=self.solver, stepping=self.stepping, kernel=self.kernel)
        return loss, g.params


def particle_norm(g: dict[str, Array]) -> Float[Array, ""]:
    r"""$\|g\|_{L^2(\nu)} = (\frac{1}{LM} \sum_{l,m} |g_{l,m}|^2)^{1/2}$ over every parameter block."""
    leaves = jax.tree.leaves(g)
    n = leaves[0].shape[0] * leaves[0].shape[1]
    return jnp.sqrt(sum(jnp.sum(x**2) for x in leaves) / n)


# ---------------------------------------------------------------------------------------------
# The training step


class StepInfo(eqx.Module):
    """Diagnostics of one step: the risk at the parameters *before* the update, and the
    $L^2(\\nu)$ norm of the mean-field gradient there."""

    loss: Float[Array, ""]
    grad_norm: Float[Array, ""]


def make_train_step(
    value_and_grad: Callable[[HeadMeasure, PyTree], tuple[Array, dict[str, Array]]],
    optimizer: optax.GradientTransformation,
):
    """The jitted training step `step(heads, opt_state, batch) -> (heads, opt_state, StepInfo)`.

    `value_and_grad(heads, batch) -> (R, g)` returns the risk and the *mean-field* gradient
    `g = L·M·dR/dθ` (e.g. `MeanFieldGradient()`); `optimizer` is usually
    `gradient_flow_optimizer(τ)`. The step is a pure function of its arguments (no closures
    over arrays), so it can be sharded over the head axis. `step.num_traces()` counts how many
    times it was traced (1 across learning-rate changes).
    """
    counter = {"traces": 0}

    def step(heads: HeadMeasure, opt_state, batch):
        counter["traces"] += 1
        loss, g = value_and_grad(heads, batch)
        updates, opt_state = optimizer.update(g, opt_state, heads.params)
        params = optax.apply_updates(heads.params, updates)
        params, opt_state = constrain_like_heads((params, opt_state), heads)  # on a mesh
        heads = eqx.tree_at(lambda h: h.params, heads, params)
        return heads, opt_state, StepInfo(loss=loss, grad_norm=particle_norm(g))

    jitted = eqx.filter_jit(step)

    def train_step(heads: HeadMeasure, opt_state, batch):
        return jitted(heads, opt_state, batch)

    train_step.num_traces = lambda: counter["traces"]
    train_step.__doc__ = make_train_step.__doc__
    return train_step


def init_optimizer(optimizer: optax.GradientTransformation, heads: HeadMeasure):
    """The optimiser state for the head parameters (the `params` dict)."""
    return optimizer.init(heads.params)


# ---------------------------------------------------------------------------------------------
# Distance travelled by the heads


def _layer_particles(heads: HeadMeasure) -> Float[Array, "N M p"]:
    """Every particle flattened: `(N, M, p)` with `p` the number of parameters of one head."""
    leaves = [heads.params[k] for k in sorted(heads.params)]
    n, m = leaves[0].shape[:2]
    return jnp.concatenate([x.reshape(n, m, -1) for x in leaves], axis=-1)


def conditional_w2(
    heads: HeadMeasure,
    reference: HeadMeasure,
    *,
    epsilon: float = 1e-3,
    threshold: float | None = None,
    max_iterations: int = 2000,
) -> tuple[Float[Array, ""], Float[Array, " N"]]:
    r"""The conditional Wasserstein distance $W_{2,c}(\nu, \nu')$ between two head measures.

    Particles move in $\theta$ only, so the natural distance couples heads at the same depth:

    $$W_{2,c}(\nu, \nu')^2 = \int_0^1 W_2^2(\nu_s, \nu'_s)\, ds = \frac{1}{N} \sum_{l} W_2^2(\nu_l, \nu'_l),$$

    with $\nu_l = \frac1M \sum_m \delta_{\theta_{l,m}}$ (for linearly interpolated heads the $N = L + 1$
    nodes are averaged the same way). Each layer's $W_2^2$ is computed with ott-jax: Sinkhorn on the
    squared-Euclidean cost matrix of the flattened $\theta$ (formed from differences, exact at
    zero distance) with an entropic
    regularisation `epsilon` *relative to the mean cost*, reporting the transport cost
    $\langle P, C\rangle$ of the resulting plan. For uniform empirical measures of $M$ points that
    plan converges to an optimal assignment as `epsilon -> 0`; at `1e-3` it matches the exact
    assignment cost to rounding in the tests.

    **Returns:** `(W_{2,c}, per_layer)` with `per_layer[l] = W_2(ν_l, ν'_l)`, shape `(N,)`.
    """
    from ott.geometry import geometry
    from ott.solvers import linear

    x = _layer_particles(heads)
    y = _layer_particles(reference).astype(x.dtype)
    if threshold is None:
        threshold = 1e-9 if x.dtype == jnp.float64 else 1e-5

    def one(xl, yl):
        # squared distances from differences (no |x|^2 + |y|^2 - 2<x, y> cancellation), row by row
        cost = jax.lax.map(lambda xi: jnp.sum((xi - yl) ** 2, axis=-1), xl)
        scale = jnp.mean(cost)
        # zero mean cost (all particles equal): W2 = 0, keep the solve well defined
        geom = geometry.Geometry(cost_matrix=jnp.where(scale > 0, cost, 1.0), epsilon=epsilon,
                                 relative_epsilon="mean")
        out = linear.solve(geom, threshold=threshold, max_iterations=max_iterations)
        return jnp.where(scale > 0, jnp.sum(out.matrix * cost), 0.0)

    w2sq = jax.vmap(one)(x, y)
    w2sq = jnp.maximum(w2sq, 0.0)
    return jnp.sqrt(jnp.mean(w2sq)), jnp.sqrt(w2sq)
