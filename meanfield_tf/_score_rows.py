r"""Rows of a softmax with a per-key bias and an optional causal mask, dense or in row blocks.

The attention rules beyond plain softmax (causal mask, L2, Sinkhorn) all reduce, for one head, to
rows of the form

$$s_{ij} = z_i^\top x_j + b_j \;(+\,{-\infty}\ \text{if causal and } j > i),\qquad
  \ell_i = \mathrm{LSE}_j\, s_{ij},\qquad y_i = \sum_j e^{s_{ij} - \ell_i}\, x_j,$$

with queries $z$ `(r, d)`, keys (= values) $x$ `(n, d)` and a key bias $b$ `(n,)` that holds
$\log w_j$ (`-inf` at padding) plus whatever the rule adds. A row with no admissible key (all
`-inf`: e.g. a causal row whose keys so far are all padding) gets $\ell_i = -\infty$ and
$y_i = 0$.

Rows come per head: queries `(n, M, d)`, biases `(M, n)`. `block=None` forms all `(M, n, n)`
scores at once. `block=c` processes the rows `c` at a time (`lax.map`), each block against all
`n` keys and the heads one at a time inside a block, and rematerialises every block and every
head in the backward pass (`jax.checkpoint`): the largest temporary is one `(c, n)` score block,
forward and gradient — memory linear in `n`. (Heads inside the blocks, not around them: what a
block computes from the row indices alone, the causal mask, is then not hoisted out of a loop
over the heads into an `(n, n)` array.) Gradients are JAX's (exact: the row maximum is held constant, which leaves
the softmax unchanged).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from ._flash import _blocks


def _scores(z, x, bias, rows: Int[Array, " r"], causal: bool):
    s = z @ x.T + bias[None, :]
    if causal:
        keys = jnp.arange(x.shape[0])
        s = jnp.where(keys[None, :] <= rows[:, None], s, -jnp.inf)
    return s


def _shifted(s):
    """`(exp(s - c), c)` with `c` the row maximum held constant (0 on rows that are all `-inf`)."""
    c = jax.lax.stop_gradient(s.max(axis=-1))
    c = jnp.where(jnp.isfinite(c), c, 0)
    return jnp.exp(s - c[:, None]), c


def _row_map(fn, n: int, block: int | None, *rows):
    """`fn(row_indices, *row_arrays)` over all `n` rows: at once, or `block` rows at a time with
    each block rematerialised in the backward pass. Padded rows (index `n`) are dropped."""
    idx = jnp.arange(n)
    if block is None or block >= n:
        return fn(idx, *rows)
    blocked = (_blocks(idx, block, n),) + tuple(_blocks(r, block, 0) for r in rows)
    out = jax.lax.map(jax.checkpoint(lambda a: fn(*a)), blocked)
    return jax.tree.map(lambda o: o.reshape((-1,) + o.shape[2:])[:n], out)


def _per_head(row_fn, causal: bool, sequential: bool):
    """`(rows, z (r, M, d), bias (M, n)) -> (r, M, ...)`: `row_fn(scores (r, n))` for every head,
    the heads one at a time (`lax.map`, each rematerialised) or all at once (`vmap`)."""

    def fn(rows, zb, x, bias):
        def head(zm, bm):
            return row_fn(_scores(zm, x, bm, rows, causal), x)

        if sequential:
            out = jax.lax.map(jax.checkpoint(lambda a: head(*a)), (jnp.swapaxes(zb, 0, 1), bias))
        else:
            out = jax.vmap(head)(jnp.swapaxes(zb, 0, 1), bias)
        return jnp.swapaxes(out, 0, 1)

    return fn


def _means(s, x):
    p, _ = _shifted(s)
    total = p.sum(axis=-1)
    return (p @ x) / jnp.where(total > 0, total, 1)[:, None]


def _lse(s, x):
    p, c = _shifted(s)
    return c + jnp.log(p.sum(axis=-1))


def softmax_means(
    z: Float[Array, "n M d"],
    x: Float[Array, "n d"],
    bias: Float[Array, "M n"],
    *,
    causal: bool = False,
    block: int | None = None,
) -> Float[Array, "n M d"]:
    """The softmax-weighted key means $y_{mi}$ `(n, M, d)` of the rows $z_{mi}$ of every head
    `m` (module docstring). `block=None`: all heads at once, `(M, n, n)` scores; `block=c`: row
    blocks of `c`, the heads one at a time inside each block (one `(c, n)` score block alive)."""
    fn = _per_head(_means, causal, block is not None)
    return _row_map(lambda rows, zb: fn(rows, zb, x, bias), x.shape[0], block, z)


def log_normalisers(
    z: Float[Array, "n M d"],
    x: Float[Array, "n d"],
    bias: Float[Array, "M n"],
    *,
    causal: bool = False,
    block: int | None = None,
) -> Float[Array, "n M"]:
    r"""The row log-sum-exps $\ell_{mi}$ `(n, M)` of the rows $z_{mi}$ of every head (as
    `softmax_means`)."""
    fn = _per_head(_lse, causal, block is not None)
    return _row_map(lambda rows, zb: fn(rows, zb, x, bias), x.shape[0], block, z)
