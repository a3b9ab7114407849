r"""Training: the conditional Wasserstein gradient flow of the head measure, driven by optax.

The heads $\nu = \int \delta_s \otimes \nu_s\, ds$ move in $\theta$ only, never in depth:

$$\frac{d\theta}{dt} = -\nabla_\theta G(s, \theta), \qquad G = \frac{\delta R}{\delta \nu}.$$

On the finite model ($L$ cells of $M$ particles) $\partial R / \partial \theta_{l,m} =
\frac{1}{LM} \nabla_\theta G(s_l, \theta_{l,m})$, so the **mean-field gradient** is
$g_{l,m} = L M\, \partial R / \partial \theta_{l,m}$ (MLP units: $L M'$, their own count, so one
step size $\tau$ moves both families along the same flow). The rescaling is done in the
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
so that it can be jitted, checkpointed, and sharded over the head axis. It is an `eqx.Module`
(`TrainStep`) whose compiled form is shared by every step built from equal settings:
`GradientFlowOptimizer` describes the optimiser by value (base, schedule), so two runs with the
same settings compile the step once.
"""

from __future__ import annotations

from typing import Any, Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Float, PyTree

from ._errors import InputError, MeanFieldError
from ._gradients import AbstractGradientMethod, Autodiff, risk_and_gradient
from ._heads import HeadMeasure
from ._sharding import constrain_like_heads
from ._solvers import DepthSolver
from ._units import head_params, unit_params


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


class GradientFlowOptimizer(eqx.Module):
    """An optimiser of the head particles described by value (hashable: equal settings share one
    compiled training step). `init`/`update` are those of `gradient_flow_optimizer`.

    **Fields** (all static):

    - `base`: `"sgd"` (explicit Euler of the gradient flow), `"momentum"` (heavy ball,
      `momentum` decay) or `"adam"` — the last two leave the gradient-flow geometry.
    - `schedule`: `"constant"`, `"cosine"` (decay to 0 over `steps - warmup_steps`) or
      `"exponential"` (factor `decay_rate` over the same span), after `warmup_steps` of linear
      warm-up.
    - `steps`: the run's length (the span of the schedule).

    The learning rate is not a field: it lives in the optimiser state (`init(params,
    learning_rate)`, `set_learning_rate`), so changing it never recompiles.
    """

    base: str = eqx.field(static=True, default="sgd")
    momentum: float = eqx.field(static=True, default=0.9)
    schedule: str = eqx.field(static=True, default="constant")
    steps: int = eqx.field(static=True, default=1)
    warmup_steps: int = eqx.field(static=True, default=0)
    decay_rate: float = eqx.field(static=True, default=0.1)

    def __check_init__(self):
        if self.base not in ("sgd", "momentum", "adam"):
            raise InputError(f"optimizer base must be sgd, momentum or adam, got {self.base!r}")
        if self.schedule not in ("constant", "cosine", "exponential"):
            raise InputError(f"schedule must be constant, cosine or exponential, got "
                             f"{self.schedule!r}")

    def shape(self) -> Callable[[Array], Array] | None:
        """The step-size shape `count -> factor` (None: constant)."""
        main = max(self.steps - self.warmup_steps, 1)
        shape = {"constant": None, "cosine": optax.cosine_decay_schedule(1.0, main),
                 "exponential": optax.exponential_decay(1.0, main, self.decay_rate)}[self.schedule]
        if self.warmup_steps:
            warm = optax.linear_schedule(0.0, 1.0, self.warmup_steps)
            shape = optax.join_schedules([warm, shape or optax.constant_schedule(1.0)],
                                         [self.warmup_steps])
        return shape

    def factor(self, step: int) -> float:
        """The schedule's factor at `step` (1 for a constant schedule)."""
        shape = self.shape()
        return 1.0 if shape is None else float(shape(step))

    def transformation(self, learning_rate: float | Array = 1.0):
        """The optax transformation (`gradient_flow_optimizer`) these settings describe."""
        base = {"sgd": None, "momentum": optax.trace(decay=self.momentum),
                "adam": optax.scale_by_adam()}[self.base]
        return gradient_flow_optimizer(learning_rate, base=base, schedule=self.shape())

    def init(self, params, learning_rate: float | Array = 1.0):
        return self.transformation(learning_rate).init(params)

    def update(self, updates, state, params=None):
        return self.transformation().update(updates, state, params)


# ---------------------------------------------------------------------------------------------
# Mean-field gradients


class MeanFieldGradient(eqx.Module):
    r"""`(heads, batch) -> (R, g)`: the risk of a `Batch` and the mean-field gradient
    $g = L M \nabla_\theta R$ (a params dict), from `risk_and_gradient`.

    **Fields:** `method` (`Autodiff()` default: with Euler and one step per layer, the exact
    gradient of the finite transformer; `Explicit()`; `Backsolve()`) and `solver`, the
    `DepthSolver` of the forward pass.
    """

    method: AbstractGradientMethod = Autodiff()
    solver: DepthSolver = DepthSolver()

    def __call__(self, heads: HeadMeasure, batch) -> tuple[Array, dict[str, Array]]:
        loss, g = risk_and_gradient(heads, batch.tokens, batch.risk, method=self.method,
                                    solver=self.solver)
        return loss, g.params


def particle_norm(g: dict[str, Array]) -> Float[Array, ""]:
    r"""$\|g\|_{L^2(\nu)} = (\frac{1}{LM} \sum_{l,m} |g_{l,m}|^2)^{1/2}$ over every parameter block;
    with MLP units, plus $\frac{1}{LM'} \sum_{l,j} |g'_{l,j}|^2$ under the root (each family
    normalised by its own particle count, so that $dR/dt = -\|g\|^2$ still holds)."""
    total = 0.0
    for family in (head_params(g), unit_params(g)):
        leaves = jax.tree.leaves(family)
        if leaves:
            n = leaves[0].shape[0] * leaves[0].shape[1]
            total = total + sum(jnp.sum(x**2) for x in leaves) / n
    return jnp.sqrt(total)


# ---------------------------------------------------------------------------------------------
# The training step


class StepInfo(eqx.Module):
    """Diagnostics of one step: the risk at the parameters *before* the update, and the
    $L^2(\\nu)$ norm of the mean-field gradient there."""

    loss: Float[Array, ""]
    grad_norm: Float[Array, ""]


class TrainStep(eqx.Module):
    """The jitted training step `step(heads, opt_state, batch) -> (heads, opt_state, StepInfo)`.

    **Fields:** `value_and_grad(heads, batch) -> (R, g)` returning the risk and the *mean-field*
    gradient `g = L·M·dR/dθ` (e.g. `MeanFieldGradient()`), and `optimizer` (an optax
    transformation such as `gradient_flow_optimizer(τ)`, or a `GradientFlowOptimizer`). The step
    is a pure function of its arguments (no closures over arrays), so it can be sharded over the
    head axis. Its compilation is cached on the (static) settings: steps built from equal
    settings share one executable, and a changed learning rate never recompiles.
    """

    value_and_grad: Callable
    optimizer: Any

    def __call__(self, heads: HeadMeasure, opt_state, batch):
        return _train_step(self.value_and_grad, self.optimizer, heads, opt_state, batch)

    @staticmethod
    def num_traces() -> int:
        """How many times any training step has been traced (compiled) in this process."""
        return eqx.debug.get_num_traces(_traced_step)


@eqx.debug.assert_max_traces(max_traces=None)  # counts compilations (see TrainStep.num_traces)
def _traced_step(value_and_grad, optimizer, heads: HeadMeasure, opt_state, batch):
    loss, g = value_and_grad(heads, batch)
    updates, opt_state = optimizer.update(g, opt_state, heads.params)
    params = optax.apply_updates(heads.params, updates)
    params, opt_state = constrain_like_heads((params, opt_state), heads)  # on a mesh
    heads = eqx.tree_at(lambda h: h.params, heads, params)
    return heads, opt_state, StepInfo(loss=loss, grad_norm=particle_norm(g))


_train_step = eqx.filter_jit(_traced_step)


def make_train_step(
    value_and_grad: Callable[[HeadMeasure, PyTree], tuple[Array, dict[str, Array]]],
    optimizer,
) -> TrainStep:
    """The jitted training step of `value_and_grad` and `optimizer` (see `TrainStep`)."""
    return TrainStep(value_and_grad, optimizer)


def init_optimizer(optimizer, heads: HeadMeasure, learning_rate=None):
    """The optimiser state for the head parameters (the `params` dict); with `learning_rate`,
    that step size is put into the state (see `set_learning_rate`)."""
    state = optimizer.init(heads.params)
    return state if learning_rate is None else set_learning_rate(state, learning_rate)


# ---------------------------------------------------------------------------------------------
# Distance travelled by the heads


def layer_particles(heads: HeadMeasure, *, units: bool = False) -> Float[Array, "N M p"]:
    """Every head particle flattened: `(N, M, p)` with `p` the number of parameters of one head;
    with `units=True`, the MLP units instead: `(N, M', 2d + 1)`."""
    params = _family(heads, units)
    leaves = [params[k] for k in sorted(params)]
    n, m = leaves[0].shape[:2]
    return jnp.concatenate([x.reshape(n, m, -1) for x in leaves], axis=-1)


def _family(heads: HeadMeasure, units: bool) -> dict[str, Array]:
    if units and not heads.has_units:
        raise InputError("these heads hold no MLP units (HeadMeasure(..., U=, W=, b=))")
    return unit_params(heads.params) if units else head_params(heads.params)


def conditional_w2(
    heads: HeadMeasure,
    reference: HeadMeasure,
    *,
    epsilon: float = 1e-3,
    threshold: float | None = None,
    max_iterations: int = 2000,
    units: bool = False,
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

    `units=True` measures the MLP-unit family $\nu'$ instead of the heads (particles
    $(u, w, b)$), the same way.

    **Returns:** `(W_{2,c}, per_layer)` with `per_layer[l] = W_2(ν_l, ν'_l)`, shape `(N,)`.
    """
    from ott.geometry import geometry
    from ott.solvers import linear

    x = layer_particles(heads, units=units)
    y = layer_particles(reference, units=units).astype(x.dtype)
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
