r"""Rows of a softmax with a per-key bias and an optional causal mask, dense or in row blocks.

The attention rules beyond plain softmax (causal mask, L2, Sinkhorn) all reduce, for one head, to
rows of the form

$$s_{ij} = z_i^\top x_j + b_j \;(+\,{-\infty}\ \text{if causal and } j > i),\qquad
  \ell_i = \mathrm{LSE}_j\, s_{ij},\qquad y_i = \sum_j e^{s_{ij} - \ell_i}\, x_j,$$

with queries $z$ `(r, d)`, keys (= values) $x$ `(n, d)` and a key bias $b$ `(n,)` that holds
$\log w_j$ (`-inf` at padding) plus whatever the rule adds. A row with no admissible key (all
`-inf`: e.g. a causal row whose keys so far are all padding) gets $\ell_i = -\infty$ and
$y_i = 0$.

`block=None` forms the `(r, n)` scores at once. `block=c` processes the rows `c` at a time
(`lax.map`), each block against all `n` keys, and rematerialises every block in the backward pass
(`jax.checkpoint`): the largest temporary is one `(c, n)` score block, forward and gradient —
memory linear in `n`. Gradients are JAX's (exact: the row maximum is held constant, which leaves
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


def softmax_means(
    z: Float[Array, "n d"],
    x: Float[Array, "n d"],
    bias: Float[Array, " n"],
    *,
    causal: bool = False,
    block: int | None = None,
) -> Float[Array, "n d"]:
    """The softmax-weighted key means $y_i$ `(n, d)` of the rows $z_i$ (module docstring)."""

    def fn(rows, zb):
        p, _ = _shifted(_scores(zb, x, bias, rows, causal))
        total = p.sum(axis=-1)
        return (p @ x) / jnp.where(total > 0, total, 1)[:, None]

    return _row_map(fn, x.shape[0], block, z)


def log_normalisers(
    z: Float[Array, "n d"],
    x: Float[Array, "n d"],
    bias: Float[Array, " n"],
    *,
    causal: bool = False,
    block: int | None = None,
) -> Float[Array, " n"]:
    r"""The row log-sum-exps $\ell_i$ `(n,)` of the rows $z_i$ (module docstring)."""

    def fn(rows, zb):
        p, c = _shifted(_scores(zb, x, bias, rows, causal))
        return c + jnp.log(p.sum(axis=-1))

    return _row_map(fn, x.shape[0], block, z)


def over_heads(fn, sequential: bool, *per_head):
    """`fn` applied to every head's slice of `per_head` (leading axis `M`): `vmap` (all heads at
    once) or `lax.map` (one head at a time: temporaries of one head only)."""
    if sequential:
        return jax.lax.map(lambda a: fn(*a), per_head)
    return jax.vmap(fn)(*per_head)
