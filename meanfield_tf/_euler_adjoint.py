r"""The exact gradient of the finite transformer by a fused discrete adjoint (explicit Euler).

With $k$ equal steps per layer, $h = 1/(Lk)$ and $\theta_j$ the heads at step $j$, the network is

$$X^{j+1} = F_j(X^j) = X^j + h\, v_{\theta_j}(X^j), \qquad
  v_\theta(x_i) = \frac1M \sum_m V_m \sum_l \operatorname{softmax}_l\big(x_i^\top A_m x_l + \log w_l\big)\, x_l,$$

($k = 1$: the transformer of $L$ layers of $M$ heads). Each step $F_j$ is **one custom-VJP
function** and the steps run in a `lax.scan`. Its forward saves, per step, only the tokens
$X^j$ `(B, n, d)`, the per-row log-sum-exp $\ell$ `(B, n M)` and the head means $y$ `(B, n, M, d)`
(the attention outputs before $V_m$). Its backward, for a cotangent $\bar X^{j+1}$, is

$$\bar X^j = \bar X^{j+1} + h\, \big(\partial v / \partial X\big)^\top \bar X^{j+1}, \qquad
  \bar\theta_j = h\, \big(\partial v / \partial \theta\big)^\top \bar X^{j+1},$$

in one pass over the score blocks: each block of scores is recomputed once from $\ell$, and the
recomputed probabilities $p$ and score cotangents $\bar s = p \circ (\bar y^\top x - D)$ serve the
three roles of the tokens together — queries ($\bar z = \bar s\, x$, hence $\bar A$ and the query
term $A \bar z$), keys ($\bar s^\top z$) and values ($p^\top \bar y$); $\bar V$ comes from the saved
$y$ (see `_flash.py` for the formulas). Nothing of size $n^2$ is stored: memory is linear in $n$
(rows in blocks of $r$ against key chunks of $c$). Nothing is recomputed across steps either: unlike
checkpointed autodiff through a solver, no step's forward is re-run in the backward pass.

**Cost per (head, query, key) pair.** Forward: $4d$ flops (scores, weighted mean) and one exp.
Backward: $10d$ flops (scores again, $\bar y^\top x$, $\bar z$, value and key cotangents) and one
exp. A backward from stored probabilities would need $8d$ flops and no exp, at $O(M n^2)$ memory.

Everything around the step (the depth interpolation of $\theta$, $A = Q^\top K$ for factored heads,
the MLP units of the block, the risk) is differentiated by JAX, so `jax.grad` of any function of
`euler_flow` is exact. Units enter after the fused attention update $Y = F_j(X)$ of each step:
$Y + h\,v'(X)$ (`Block` sum) or $Y + h\,v'(Y)$ (sequential); their cost is $O(B n M' d)$ per
step, negligible against attention's $O(B n^2 M d)$.
"""

from __future__ import annotations

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from ._errors import InputError
from ._flash import _backward, _forward, weight_cotangent
from ._flow import check_compatible
from ._heads import HeadMeasure, interpolate_cell, merged_query_key
from ._native_attention import (native_mode, native_or_xla, native_step_backward,
                                native_step_forward, native_usable)
from ._risks import AbstractRisk
from ._tokens import TokenBatch, log_weights
from ._units import Block


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def euler_step(
    x: Float[Array, "B n d"],
    w: Float[Array, "B n"],
    A: Float[Array, "M d d"],
    V: Float[Array, "M d d"],
    h: float,
    chunk_size: int,
    block_rows: int | None,
) -> Float[Array, "B n d"]:
    r"""One explicit Euler step $X + h\, v_{A,V}(X)$ of every sequence of the batch.

    Memory linear in `n`: `(block_rows, chunk_size)` score blocks, sequences one at a time.
    Differentiable in `x`, `w`, `A`, `V` by the fused backward pass (module docstring); the
    gradient in `w` is exact where `w > 0` and 0 at padding.
    """
    return _step_fwd(x, w, A, V, h, chunk_size, block_rows)[0]


def _step_fwd(x, w, A, V, h, chunk_size, block_rows):
    B, n, d = x.shape
    M = A.shape[0]

    def xla(x, w, A, V):  # sequences one at a time: cache-sized blocks
        v, y, lse = jax.lax.map(lambda xw: _forward(xw[0], xw[1], A, V, chunk_size, block_rows),
                                (x, w))
        return v, y, lse.reshape(B, n, M)

    def native(x, w, A, V):  # one call: rows, queries and values formed in the kernel
        return native_step_forward(x, log_weights(w), A, V)

    v, y, lse = native_or_xla(native_usable(x.dtype, d), native, xla, x, w, A, V)
    return x + h * v, (x, w, A, V, y, lse)


def _step_bwd(h, chunk_size, block_rows, res, g):
    x, w, A, V, y, lse = res
    B, n, d = x.shape

    def xla(x, w, A, V, y, lse, g):
        def step(carry, seq):  # sequences one at a time: cache-sized blocks, dA, dV accumulated
            dA, dV = carry
            xi, wi, yi, li, gi = seq
            dx, dw, dAi, dVi = _backward(xi, wi, A, V, yi, li.reshape(-1), h * gi, chunk_size,
                                         block_rows)
            return (dA + dAi, dV + dVi), (dx, dw)

        (dA, dV), (dx, dw) = jax.lax.scan(step, (jnp.zeros_like(A), jnp.zeros_like(V)),
                                          (x, w, y, lse, g))
        return dx, dw, dA, dV

    def native(x, w, A, V, y, lse, g):
        dx, dlw, dA, dV = native_step_backward(x, log_weights(w), A, V, y, lse, h * g)
        return dx, weight_cotangent(dlw, w), dA, dV

    dx, dw, dA, dV = native_or_xla(native_usable(x.dtype, d), native, xla, x, w, A, V, y, lse, g)
    return g + dx, dw, dA, dV


euler_step.defvjp(_step_fwd, _step_bwd)


def _check_options(steps_per_layer, chunk_size, block_rows) -> None:
    if int(steps_per_layer) != steps_per_layer or steps_per_layer < 1:
        raise InputError(f"steps_per_layer must be an integer >= 1, got {steps_per_layer}")
    if chunk_size is not None and chunk_size < 1:
        raise InputError(f"chunk_size must be >= 1 or None (all keys in one chunk), got {chunk_size}")
    if block_rows is not None and block_rows < 1:
        raise InputError(f"block_rows must be >= 1 or None (automatic), got {block_rows}")


def _flow_params(params, interpolation, x, w, k, chunk_size, block_rows, block):
    """`X_1` from the raw parameter dict (what `jax.grad` differentiates)."""
    n = x.shape[1]
    c = n if chunk_size is None else min(chunk_size, n)
    if interpolation == "linear":
        L = params["V"].shape[0] - 1
        cells = ({a: b[:-1] for a, b in params.items()}, {a: b[1:] for a, b in params.items()})
    else:
        L = params["V"].shape[0]
        cells = (params, None)
    h = 1.0 / (L * k)
    dtype = x.dtype

    def substep(left, right, x, j):
        theta = left if right is None else interpolate_cell(left, right, j.astype(dtype) / k)
        y = euler_step(x, w, merged_query_key(theta), theta["V"], h, c, block_rows)
        return block.step(x, y, theta, h)

    def cell(x, lr):
        left, right = lr
        if k == 1:
            return substep(left, right, x, jnp.zeros((), jnp.int32)), None
        x, _ = jax.lax.scan(lambda x, j: (substep(left, right, x, j), None), x, jnp.arange(k))
        return x, None

    x1, _ = jax.lax.scan(cell, x, cells)
    return x1


def euler_flow(
    heads: HeadMeasure,
    x: Float[Array, "B n d"],
    w: Float[Array, "B n"],
    *,
    steps_per_layer: int = 1,
    chunk_size: int | None = None,
    block_rows: int | None = None,
    block: Block = Block(),
) -> Float[Array, "B n d"]:
    r"""Final tokens $X_1$ of the finite transformer: `steps_per_layer` Euler steps per layer.

    The same map as `flow(heads, tokens)` with `diffrax.Euler()` and `FixedSteps(k)` (any kernel),
    built from the fused custom-VJP step `euler_step`, so that `jax.grad` of any function of the
    output differentiates in `heads.params`, `x` and `w` without re-running the forward.

    **Arguments:**

    - `heads`: `L` layers of `M` heads, merged `(A, V)` or factored `(Q, K, V)`, piecewise (one
      set per layer) or linear in depth (`L + 1` nodes, interpolated at each substep
      $s = (l + j/k)/L$).
    - `x` `(B, n, d)`, `w` `(B, n)`: the token batch (zero weight: padding or query tokens).
    - `chunk_size`: keys per chunk (`None`: all `n` keys in one chunk).
    - `block_rows`: (head, query) rows per block (`None`: about `2^18 / chunk_size`).
    - `block`: how MLP units (if `heads` holds any) act, as in `DepthSolver.block`.
    """
    _check_options(steps_per_layer, chunk_size, block_rows)
    check_compatible(heads, TokenBatch(x, w, check=False))
    return _jit_flow(heads.params, heads.interpolation, x, w, steps_per_layer, chunk_size,
                     block_rows, block, native_mode())


@functools.partial(jax.jit, static_argnums=(1, 4, 5, 6, 7, 8))
def _jit_flow(params, interpolation, x, w, k, chunk_size, block_rows, block, native):
    del native  # read again at trace time; a static argument so that each mode has its trace
    return _flow_params(params, interpolation, x, w, k, chunk_size, block_rows, block)


def euler_risk_and_gradient(
    heads: HeadMeasure,
    tokens: TokenBatch,
    risk: AbstractRisk,
    *,
    steps_per_layer: int = 1,
    chunk_size: int | None = None,
    block_rows: int | None = None,
    wrt_tokens: bool = False,
    block: Block = Block(),
):
    r"""The risk $R$ of the finite transformer and its **mean-field** gradient
    $g_{l,m} = L\,M\,\partial R/\partial\theta_{l,m}$, by the fused discrete adjoint.

    Exactly the gradient that `risk_and_gradient(heads, tokens, risk, method=Autodiff())` returns
    with `diffrax.Euler()` and `FixedSteps(steps_per_layer)` (up to rounding), at memory linear in
    `n` and without re-running any step's forward.

    **Arguments:** as `euler_flow`, plus `tokens` (a `TokenBatch`), `risk` (an `AbstractRisk`) and

    - `wrt_tokens`: also return $\partial R / \partial x$ `(B, n, d)`, the gradient of the risk
      in the input token positions (plain, not rescaled).

    **Returns:** `(loss, grads)` — or `(loss, grads, dx)` with `wrt_tokens=True` — where `grads` is
    a dict keyed like `heads.params` (`A`, `V` or `Q`, `K`, `V`, and `U`, `W`, `b` for units,
    scaled by `L M'`; factored heads by the chain rule
    through $A = Q^\top K$; linear interpolation: each node collects the hat-weighted gradients of
    the steps on both sides).
    """
    if not isinstance(heads, HeadMeasure):
        raise InputError(f"heads must be a HeadMeasure, got {type(heads).__name__}")
    if not isinstance(tokens, TokenBatch):
        raise InputError(f"tokens must be a TokenBatch, got {type(tokens).__name__}")
    if not isinstance(risk, AbstractRisk):
        raise InputError(
            f"risk must be a meanfield_tf risk (TokenRegression, QueryRegression, "
            f"QueryClassification, SinkhornRisk), got {type(risk).__name__}"
        )
    _check_options(steps_per_layer, chunk_size, block_rows)
    check_compatible(heads, tokens)
    risk.validate(tokens)
    loss, grads, dx = _risk_and_gradient(heads.params, heads.interpolation, tokens, risk,
                                         steps_per_layer, chunk_size, block_rows, block,
                                         native_mode())
    scale = heads.mean_field_scale()
    grads = {name: scale[name] * g for name, g in grads.items()}
    return (loss, grads, dx) if wrt_tokens else (loss, grads)


@eqx.filter_jit
def _risk_and_gradient(params, interpolation, tokens, risk, k, chunk_size, block_rows,
                       block=Block(), native="auto"):
    del native  # static (a string): one trace per native-kernel mode
    def loss_fn(params, x):
        x1 = _flow_params(params, interpolation, x, tokens.w, k, chunk_size, block_rows, block)
        return risk(x1, tokens.w)

    loss, (grads, dx) = jax.value_and_grad(loss_fn, argnums=(0, 1))(params, tokens.x)
    return loss, grads, dx


def chunked_adjoint_and_gradient(
    states: Float[Array, "B n d"],
    weights: Float[Array, "B n"],
    adjoints: Float[Array, "B n d"],
    params: dict[str, Array],
    *,
    chunk_size: int | None = None,
    block_rows: int | None = None,
) -> tuple[Float[Array, "B n d"], dict[str, Array]]:
    r"""`adjoint_and_gradient` (the closed forms of the `Explicit` method) at memory linear in `n`.

    Returns $(\partial v/\partial X)^\top \lambda$ `(B, n, d)` (local and non-local terms,
    head-averaged) and the gradient field $\nabla_\theta G$ at `params` (keyed like `params`,
    factored heads by the chain rule), the same quantities as
    `meanfield_tf._adjoint.adjoint_and_gradient(states, weights, adjoints, params)`, but through
    the fused backward pass: one memory-linear forward for the row statistics, then one pass over
    the score blocks, instead of the dense `(M, n, n)` softmax. For the discrete adjoint of Euler,
    $\lambda_j = \lambda_{j+1} + h\,(\partial v/\partial X)(X_j)^\top\lambda_{j+1}$ and
    $g_j = h L\, \nabla_\theta G(X_j, \lambda_{j+1})$ (times the interpolation weight), this is the
    backward of `euler_step` with cotangent $\lambda_{j+1}$.
    """
    from ._adjoint import _chain_rule

    A = merged_query_key(params)
    V = params["V"]
    B, n, _ = states.shape
    c = n if chunk_size is None else min(chunk_size, n)

    def one(carry, seq):
        gA, gV = carry
        x, w, lam = seq
        _, y, lse = _forward(x, w, A, V, c, block_rows)
        dx, _, dA, dV = _backward(x, w, A, V, y, lse, lam, c, block_rows)
        return (gA + dA, gV + dV), dx

    (gA, gV), adj = jax.lax.scan(one, (jnp.zeros_like(A), jnp.zeros_like(V)),
                                 (states, weights, adjoints))
    scale = A.shape[0] / B  # dA, dV carry the head average 1/M; the field is a batch mean
    return adj, _chain_rule(params, scale * gA, scale * gV)
