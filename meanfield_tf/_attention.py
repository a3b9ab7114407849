r"""The attention kernel: the head-averaged velocity of every token of one sequence.

For a sequence $\mu = \sum_j w_j \delta_{x_j}$ and $M$ heads $(A_m, V_m)$,

$$v(x_i) = \frac{1}{M}\sum_{m=1}^M V_m \sum_j \operatorname{softmax}_j\big(x_i^\top A_m x_j + \log w_j\big)\, x_j
        = \frac{1}{M}\sum_m V_m \nabla \mathrm{LSE}_\mu(A_m^\top x_i).$$

Zero-weight tokens get score $-\infty$: they are exact padding as keys, and still move as queries.
Two implementations with one interface, `kernel(x, w, A, V) -> v` for one sequence:

- `DenseKernel`: materialises the `(M, n, n)` scores; the reference.
- `ChunkedKernel`: streams over key chunks with an online log-sum-exp (running max and running
  normaliser), so that no `n × n` block per head is ever formed; memory `O(M n c)` for chunk size
  `c`. A chunk size that does not divide `n` is handled by zero-weight padding.

`attention_velocity` applies a kernel to a whole batch (vmapped over sequences).
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from ._errors import InputError


def log_weights(w: Float[Array, "... n"]) -> Float[Array, "... n"]:
    """`log w` with `-inf` at `w = 0`, with a finite (zero) gradient there."""
    pos = w > 0
    return jnp.where(pos, jnp.log(jnp.where(pos, w, 1)), -jnp.inf)


class DenseKernel(eqx.Module):
    """Dense reference kernel: forms all `(M, n, n)` scores at once."""

    def __call__(
        self,
        x: Float[Array, "n d"],
        w: Float[Array, " n"],
        A: Float[Array, "M d d"],
        V: Float[Array, "M d d"],
    ) -> Float[Array, "n d"]:
        xa = jnp.einsum("nd,mde->mne", x, A)
        scores = jnp.einsum("mne,ke->mnk", xa, x) + log_weights(w)
        p = jax.nn.softmax(scores, axis=-1)
        xv = jnp.einsum("kd,med->mke", x, V)
        return jnp.einsum("mnk,mke->ne", p, xv) / A.shape[0]


class ChunkedKernel(eqx.Module):
    """Memory-linear kernel: online log-sum-exp over key chunks of `chunk_size` tokens."""

    chunk_size: int = eqx.field(static=True, default=256)

    def __check_init__(self):
        if self.chunk_size < 1:
            raise InputError(f"chunk_size must be >= 1, got {self.chunk_size}")

    def __call__(
        self,
        x: Float[Array, "n d"],
        w: Float[Array, " n"],
        A: Float[Array, "M d d"],
        V: Float[Array, "M d d"],
    ) -> Float[Array, "n d"]:
        n, d = x.shape
        m_heads = A.shape[0]
        c = min(self.chunk_size, n)
        num_chunks = -(-n // c)
        pad = num_chunks * c - n
        xk = jnp.pad(x, ((0, pad), (0, 0))).reshape(num_chunks, c, d)
        lw = jnp.pad(log_weights(w), (0, pad), constant_values=-jnp.inf).reshape(num_chunks, c)
        xa = jnp.einsum("nd,mde->mne", x, A)

        def step(carry, chunk):
            run_max, run_sum, acc = carry
            xc, lwc = chunk
            s = jnp.einsum("mne,ke->mnk", xa, xc) + lwc
            new_max = jnp.maximum(run_max, s.max(axis=-1))
            safe = jnp.where(jnp.isfinite(new_max), new_max, 0)
            corr = jnp.exp(run_max - safe)
            p = jnp.exp(s - safe[..., None])
            run_sum = run_sum * corr + p.sum(axis=-1)
            acc = acc * corr[..., None] + jnp.einsum("mnk,kd->mnd", p, xc)
            return (new_max, run_sum, acc), None

        init = (
            jnp.full((m_heads, n), -jnp.inf, x.dtype),
            jnp.zeros((m_heads, n), x.dtype),
            jnp.zeros((m_heads, n, d), x.dtype),
        )
        (_, total, acc), _ = jax.lax.scan(step, init, (xk, lw))
        y = acc / total[..., None]
        return jnp.einsum("med,mnd->ne", V, y) / m_heads


AttentionKernel = DenseKernel | ChunkedKernel


def attention_velocity(
    kernel: AttentionKernel,
    x: Float[Array, "B n d"],
    w: Float[Array, "B n"],
    A: Float[Array, "M d d"],
    V: Float[Array, "M d d"],
) -> Float[Array, "B n d"]:
    """Head-averaged attention velocity of every token of every sequence (vmapped over `B`)."""
    return jax.vmap(kernel, in_axes=(0, 0, None, None))(x, w, A, V)
