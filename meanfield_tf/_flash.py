r"""Memory-linear attention with its own backward pass (flash-attention style, online LSE).

For one sequence $\mu = \sum_j w_j \delta_{x_j}$ and $M$ heads $(A_m, V_m)$, with
$z_{mi} = A_m^\top x_i$ (the head's query), scores $s_{mij} = z_{mi}^\top x_j + \log w_j$,
$\ell_{mi} = \mathrm{LSE}_j\, s_{mij}$, $p_{mij} = e^{s_{mij} - \ell_{mi}}$, $y_{mi} = \sum_j p_{mij} x_j$:

$$v_i = \frac{1}{M} \sum_m V_m\, y_{mi}.$$

**Forward.** The $Mn$ (head, query) pairs are rows $z_{mi}$ that share the same keys; rows are
taken in blocks of $r$, keys are streamed in chunks of $c$ tokens with a running max and a
running normaliser (online log-sum-exp), so that the largest temporary is one `(r, c)` score
block (sized to stay in cache) instead of the `(M, n, n)` scores. It returns $v$ and saves the
per-row statistics $\ell$ `(n M,)` and the head means $y$ `(n, M, d)`: memory linear in $n$.

**Backward.** For a cotangent $g_i$ of $v_i$, with $\bar y_{mi} = V_m^\top g_i / M$ and
$D_{mi} = \bar y_{mi}^\top y_{mi}$, the scores are recomputed chunk by chunk from $\ell$ and

$$\bar s_{mij} = p_{mij}\,(\bar y_{mi}^\top x_j - D_{mi}),\qquad
\bar V_m = \tfrac{1}{M}\sum_i g_i\, y_{mi}^\top,\qquad
\bar z_{mi} = \sum_j \bar s_{mij}\, x_j,\qquad \bar A_m = \sum_i x_i \bar z_{mi}^\top,$$

$$\bar x_j = \underbrace{\sum_{m,i} p_{mij}\,\bar y_{mi}}_{\text{as value}}
 + \underbrace{\sum_{m,i} \bar s_{mij}\, z_{mi}}_{\text{as key}}
 + \underbrace{\sum_m A_m \bar z_{mj}}_{\text{as query}},\qquad
\bar w_j = \frac{1}{w_j}\sum_{m,i} \bar s_{mij}\ (w_j > 0),\quad \bar w_j = 0\ (w_j = 0).$$

The same $x$ plays all three roles, and its cotangent is their sum. The gradient in $w$ is exact
for positive weights; at a zero weight (padding) it is set to 0 — the derivative of $\log w$ is
infinite there, and padding is data, not a parameter. Per (head, query, key) pair the forward
costs $4d$ flops and one exp, the backward $10d$ flops and one exp (scores recomputed, never
stored).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from ._native_attention import (native_or_xla, native_rows_backward, native_rows_forward,
                                native_usable)
from ._tokens import log_weights


def _blocks(a: Array, size: int, fill) -> Array:
    """Pad the leading axis of `a` to a multiple of `size` with `fill` and split it into blocks."""
    n = a.shape[0]
    k = -(-n // size)
    pad = k * size - n
    a = jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1), constant_values=fill)
    return a.reshape((k, size) + a.shape[1:])


def _fwd_block(z, xk, lwk):
    """Online-LSE pass of query rows `z` `(r, d)` over key chunks `xk` `(K, c, d)`, `lwk` `(K, c)`.

    Returns the row means `y` `(r, d)` and the row statistics `lse` `(r,)`.
    """
    r, d = z.shape
    dtype = z.dtype

    def step(carry, chunk):
        run_max, run_sum, acc = carry
        xc, lwc = chunk
        s = z @ xc.T + lwc
        new_max = jnp.maximum(run_max, s.max(axis=-1))
        safe = jnp.where(jnp.isfinite(new_max), new_max, 0)
        corr = jnp.exp(run_max - safe)
        p = jnp.exp(s - safe[:, None])
        run_sum = run_sum * corr + p.sum(axis=-1)
        acc = acc * corr[:, None] + p @ xc
        return (new_max, run_sum, acc), None

    if xk.shape[0] == 1:  # one chunk: a plain max-shifted softmax, no rescaling
        s = z @ xk[0].T + lwk[0]
        mx = s.max(axis=-1)
        run_max = jnp.where(jnp.isfinite(mx), mx, 0)
        p = jnp.exp(s - run_max[:, None])
        total = p.sum(axis=-1)
        acc = p @ xk[0]
    else:
        init = (jnp.full((r,), -jnp.inf, dtype), jnp.zeros((r,), dtype), jnp.zeros((r, d), dtype))
        (run_max, total, acc), _ = jax.lax.scan(step, init, (xk, lwk))
        run_max = jnp.where(jnp.isfinite(run_max), run_max, 0)
    y = acc / total[:, None]
    lse = run_max + jnp.log(total)
    return y, lse


def _bwd_block(z, gy, D, lse, xk, lwk):
    """Backward of one block of query rows against all key chunks.

    Returns `dz` transposed, `(d, r)`, and, per key chunk, the key/value cotangent `(K, c, d)` and
    the score column sums `(K, c)` (the cotangent of `log w`).
    """

    def chunk_grads(xc, lwc):
        # key-major (c, r) layout: the value/key products `p gy`, `ds z` contract the minor
        # axis, and the query product is formed transposed, `x_cᵀ ds` `(d, r)`, which contracts
        # the major axis of `ds` with the small matrix as the transposed operand (measured 2-5x
        # faster on CPU than `dsᵀ x_c` or the row-major (r, c) layout)
        pt = jnp.exp(xc @ z.T + lwc[:, None] - lse[None, :])
        dst = pt * (xc @ gy.T - D[None, :])
        dzt = xc.T @ dst
        dxc = pt @ gy + dst @ z
        return dzt, dxc, dst.sum(axis=1)

    if xk.shape[0] == 1:
        dzt, dxc, dlw = chunk_grads(xk[0], lwk[0])
        return dzt, dxc[None], dlw[None]

    def step(dzt, chunk):
        dzc, dxc, dlw = chunk_grads(*chunk)
        return dzt + dzc, (dxc, dlw)

    d, r = z.shape[1], z.shape[0]
    dzt, (dxk, dlwk) = jax.lax.scan(step, jnp.zeros((d, r), z.dtype), (xk, lwk))
    return dzt, dxk, dlwk


def _queries(x, A):
    """The query rows `z` `(n M, d)`, token-major: row `i M + m` is $A_m^\top x_i$.

    Token-major rows make every per-token product over the heads one plain matrix product
    (`x (A_1 .. A_M)` for the queries, `(y_1 .. y_M) V` for the output, and so on in the
    backward) instead of `M` small batched ones."""
    return jnp.einsum("nd,mde->nme", x, A).reshape(-1, x.shape[1])


def _row_block_size(rows: int, c: int, block_rows: int | None) -> int:
    if block_rows is None:  # auto: a (rows, keys) score block of about 2^18 entries (1 MB f32)
        block_rows = max(1, (1 << 18) // c)
    return min(block_rows, rows)


def _rows_forward(z, x, w, chunk_size, block_rows, native=True):
    """Row means `y` `(R, d)` and statistics `lse` `(R,)` of the query rows `z` `(R, d)`: on the
    CPU by the native kernel when it is usable (`_native_attention`), else in XLA blocks.
    `native=False` keeps XLA (the native call has no derivative of its own: only the custom
    VJPs built on `_rows_backward` may use it)."""
    n, d = x.shape
    rows = z.shape[0]

    def xla(z, x, w):
        c = min(chunk_size, n)
        xk, lwk = _blocks(x, c, 0), _blocks(log_weights(w), c, -jnp.inf)
        r = _row_block_size(rows, c, block_rows)
        if r >= rows:
            return _fwd_block(z, xk, lwk)
        y, lse = jax.lax.map(lambda zb: _fwd_block(zb, xk, lwk), _blocks(z, r, 0))
        return y.reshape(-1, d)[:rows], lse.reshape(-1)[:rows]

    return native_or_xla(native and native_usable(z.dtype, d),
                         lambda z, x, w: native_rows_forward(z, x, log_weights(w)), xla, z, x, w)


def _forward(x, w, A, V, chunk_size, block_rows, native=True):
    n, d = x.shape
    m_heads = A.shape[0]
    z = _queries(x, A)
    y, lse = _rows_forward(z, x, w, chunk_size, block_rows, native)
    y = y.reshape(n, m_heads, d)
    v = jnp.einsum("med,nmd->ne", V, y) / m_heads
    return v, y, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def flash_attention(
    x: Float[Array, "n d"],
    w: Float[Array, " n"],
    A: Float[Array, "M d d"],
    V: Float[Array, "M d d"],
    chunk_size: int,
    block_rows: int | None,
) -> Float[Array, "n d"]:
    """Head-averaged attention velocity `(n, d)` of one sequence, memory linear in `n`.

    The `M n` (head, query) rows are processed in blocks of `block_rows` rows (`None`: about
    `2^18 / chunk_size`, a score block of ~1 MB in float32), each against the keys in chunks of
    `chunk_size`. Differentiable in `x`, `w`, `A`, `V` through the custom backward pass above.
    """
    return _forward(x, w, A, V, chunk_size, block_rows)[0]


def _flash_fwd(x, w, A, V, chunk_size, block_rows):
    v, y, lse = _forward(x, w, A, V, chunk_size, block_rows)
    return v, (x, w, A, V, y, lse)


def _rows_backward(z, gy, D, lse, x, w, chunk_size, block_rows):
    """Cotangents of the rows, transposed (`dz` as `(d, R)`), of the keys/values `x` `(n, d)` and
    of the log-weights `(n,)`, for row-mean cotangents `gy` `(R, d)` and `D = Σ gy·y` `(R,)`:
    by the native kernel on the CPU when usable, else in XLA blocks."""
    n, d = x.shape
    rows = z.shape[0]

    def xla(z, gy, D, lse, x, w):
        c = min(chunk_size, n)
        xk, lwk = _blocks(x, c, 0), _blocks(log_weights(w), c, -jnp.inf)
        r = _row_block_size(rows, c, block_rows)
        if r >= rows:
            dzt, dxk, dlwk = _bwd_block(z, gy, D, lse, xk, lwk)
        else:
            def step(carry, blk):
                dxk_acc, dlwk_acc = carry
                dztb, dxkb, dlwkb = _bwd_block(*blk, xk, lwk)
                return (dxk_acc + dxkb, dlwk_acc + dlwkb), dztb

            (dxk, dlwk), dzt = jax.lax.scan(
                step, (jnp.zeros_like(xk), jnp.zeros_like(lwk)),
                (_blocks(z, r, 0), _blocks(gy, r, 0), _blocks(D, r, 0), _blocks(lse, r, 0)),
            )
            dzt = jnp.swapaxes(dzt, 0, 1).reshape(d, -1)[:, :rows]
        return dzt, dxk.reshape(-1, d)[:n], dlwk.reshape(-1)[:n]

    def native(z, gy, D, lse, x, w):
        dz, dx, dlw = native_rows_backward(z, x, log_weights(w), lse, gy, D)
        return dz.T, dx, dlw

    return native_or_xla(native_usable(z.dtype, d), native, xla, z, gy, D, lse, x, w)


def _backward(x, w, A, V, y, lse, g, chunk_size, block_rows):
    """Cotangents `(dx, dw, dA, dV)` of one sequence's velocity for the cotangent `g` `(n, d)`,
    from the saved head means `y` `(n, M, d)` and row statistics `lse` `(n M,)`: each score block
    is recomputed once and serves the query, key and value roles of `x` together."""
    n, d = x.shape
    m_heads = A.shape[0]
    z = _queries(x, A)
    gy = jnp.einsum("ne,med->nmd", g, V) / m_heads
    dV = jnp.einsum("ne,nmd->med", g, y) / m_heads
    D = jnp.sum(gy * y, axis=-1).reshape(-1)
    gy = gy.reshape(-1, d)
    dzt, dxk, dlw = _rows_backward(z, gy, D, lse, x, w, chunk_size, block_rows)
    dzt = dzt.reshape(d, n, m_heads)  # dz transposed: (e, i, m)
    dx = dxk + jnp.einsum("enm,mde->nd", dzt, A)
    dA = jnp.einsum("nd,enm->mde", x, dzt)
    return dx, weight_cotangent(dlw, w), dA, dV


def weight_cotangent(dlw, w):
    """The cotangent of the weights `w` from that of their logarithms: `dlw / w` where `w > 0`,
    0 at padding (the derivative of `log w` is infinite there, and padding is data)."""
    pos = w > 0
    return jnp.where(pos, dlw / jnp.where(pos, w, 1), 0)


def _flash_bwd(chunk_size, block_rows, res, g):
    x, w, A, V, y, lse = res
    return _backward(x, w, A, V, y, lse, g, chunk_size, block_rows)


flash_attention.defvjp(_flash_fwd, _flash_bwd)
