r"""The attention kernel: the head-averaged velocity of every token of one sequence.

For a sequence $\mu = \sum_j w_j \delta_{x_j}$ and $M$ heads $(A_m, V_m)$,

$$v(x_i) = \frac{1}{M}\sum_{m=1}^M V_m \sum_j \operatorname{softmax}_j\big(x_i^\top A_m x_j + \log w_j\big)\, x_j
        = \frac{1}{M}\sum_m V_m \nabla \mathrm{LSE}_\mu(A_m^\top x_i).$$

Zero-weight tokens get score $-\infty$: they are exact padding as keys, and still move as queries.
Every kernel is an `AbstractKernel`: `kernel(x, w, A, V) -> v` for one sequence, and
`kernel.velocity(x, w, A, V)` for a batch. Two implementations:

- `DenseKernel`: materialises the `(M, n, n)` scores; the reference.
- `ChunkedKernel`: streams over key chunks with an online log-sum-exp (running max and running
  normaliser), so that no `n × n` block per head is ever formed; memory `O(M n c)` for chunk size
  `c` (`O(r c)` with blocks of `r` (head, query) rows). A chunk size that does not divide `n` is handled by
  zero-weight padding. Its gradient is a flash-attention-style custom VJP (`_flash.py`): memory
  linear in `n`, about 2.5 forward passes of flops.

Both take `causal=True`: token $i$ attends to keys $j \le i$ in sequence order only (padding stays
exact; a row whose admissible keys are all padding gets velocity 0). The causal kernels compute
through `meanfield_tf._score_rows` (the chunked one in query blocks of `chunk_size` rows,
rematerialised: memory linear in `n`) and are differentiated by JAX; the fused adjoint, the
explicit closed forms and the Gaussian limit are those of the unmasked rule and are refused.

`attention_velocity(kernel, ...)` applies a kernel to a whole batch. A new kernel is one subclass
of `AbstractKernel` (and a name in `meanfield_tf.workflow.build` for the command line). Other
rules: L2 attention (`_l2_attention.py`), Sinkhorn attention (`_sinkhorn.py`).
"""

from __future__ import annotations

import abc
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from ._errors import InputError, check_chunk_size
from ._flash import _forward, flash_attention
from ._score_rows import softmax_means
from ._tokens import log_weights


class AbstractKernel(eqx.Module):
    """An attention kernel: the head-averaged velocity of the tokens of one sequence.

    Subclasses implement `__call__(x (n, d), w (n,), A (M, d, d), V (M, d, d)) -> (n, d)`;
    `velocity` maps it over a batch of sequences (override it to stream instead of vmap).
    `memory_linear` says whether its memory (gradient included) is linear in `n`;
    `fused_chunks` whether the fused discrete adjoint of the finite transformer can stand in for
    differentiating it; `plain_softmax` whether it computes the plain softmax rule above (then
    the explicit adjoint's closed forms apply); `gaussian_velocity` the affine velocity it
    induces on a Gaussian token measure (the infinite-token limit), if it has one.
    """

    memory_linear: ClassVar[bool] = False

    def plain_softmax(self) -> bool:
        """`True` when the kernel computes the unmasked softmax rule of this module (to
        rounding): the closed forms of the explicit adjoint and the softmax Gaussian limit hold."""
        return False

    def gaussian_velocity(
        self,
        A: Float[Array, "M d d"],
        V: Float[Array, "M d d"],
        mean: Float[Array, " d"],
        cov: Float[Array, "d d"],
    ) -> tuple[Float[Array, "d d"], Float[Array, " d"]]:
        r"""`(B, c)`: the head-averaged velocity on $\mu = N(m, \Sigma)$ is $v(x) = B x + c$.

        Softmax: $a_\theta[\mu](x) = V(m + \Sigma A^\top x)$, so $B = \frac1M\sum_m V_m\Sigma
        A_m^\top$, $c = \frac1M \sum_m V_m m$. Raises `InputError` for a rule without a Gaussian
        limit."""
        if not self.plain_softmax():
            raise InputError(
                f"{type(self).__name__} has no Gaussian limit (a causal mask needs a sequence "
                f"order, which a Gaussian measure does not have): use an unmasked kernel "
                f"(causal=False) for the Gaussian moment flow")
        mh = A.shape[0]
        return jnp.einsum("mij,jk,mlk->il", V, cov, A) / mh, jnp.einsum("mij,j->i", V, mean) / mh

    def fused_chunks(self) -> tuple[int | None, int | None] | None:
        """`(chunk_size, block_rows)` with which the flash-style computation of
        `meanfield_tf._flash` gives this kernel's velocity (to rounding), or `None` when it
        does not (then gradients go through the kernel itself)."""
        return None

    @abc.abstractmethod
    def __call__(
        self,
        x: Float[Array, "n d"],
        w: Float[Array, " n"],
        A: Float[Array, "M d d"],
        V: Float[Array, "M d d"],
    ) -> Float[Array, "n d"]:
        """The velocity $v(x_i)$ of every token of one sequence."""

    def velocity(
        self,
        x: Float[Array, "B n d"],
        w: Float[Array, "B n"],
        A: Float[Array, "M d d"],
        V: Float[Array, "M d d"],
    ) -> Float[Array, "B n d"]:
        """The velocity of every token of every sequence (vmapped over the `B` sequences)."""
        return jax.vmap(self, in_axes=(0, 0, None, None))(x, w, A, V)


class DenseKernel(AbstractKernel):
    """Dense reference kernel: forms all `(M, n, n)` scores at once.

    **Fields:** `causal`: token `i` attends to keys `j ≤ i` only (default `False`).
    """

    causal: bool = eqx.field(static=True, default=False)

    def fused_chunks(self):
        return None if self.causal else (None, None)  # one chunk of all n keys

    def plain_softmax(self):
        return not self.causal

    def __call__(
        self,
        x: Float[Array, "n d"],
        w: Float[Array, " n"],
        A: Float[Array, "M d d"],
        V: Float[Array, "M d d"],
    ) -> Float[Array, "n d"]:
        if self.causal:
            return _causal(x, w, A, V, None)
        xa = jnp.einsum("nd,mde->mne", x, A)
        scores = jnp.einsum("mne,ke->mnk", xa, x) + log_weights(w)
        p = jax.nn.softmax(scores, axis=-1)
        xv = jnp.einsum("kd,med->mke", x, V)
        return jnp.einsum("mnk,mke->ne", p, xv) / A.shape[0]


class ChunkedKernel(AbstractKernel):
    """Memory-linear kernel: online log-sum-exp over key chunks, with its own backward pass.

    **Fields:**

    - `chunk_size`: keys per chunk `c` (default 256); need not divide `n` (zero-weight padding).
    - `block_rows`: (head, query) rows per block `r` (default `None`: about `2^18 / c`, a
      score block of ~1 MB in float32 that stays in cache). The `M n` rows are processed `r` at
      a time, so the largest temporary is `(r, c)` per sequence whatever `n` and `M`.
    - `custom_vjp`: `True` (default) differentiates with the flash-style backward of
      `meanfield_tf._flash` (scores recomputed chunk by chunk from the saved per-row LSE; memory
      linear in `n`); `False` lets JAX differentiate the forward scan (stores every chunk's
      scores: memory `O(M n^2)` again, kept as a reference).

    - `causal`: token `i` attends to keys `j ≤ i` only (default `False`). Then the query rows go
      in blocks of `chunk_size` against all keys, each block rematerialised in the backward
      pass (memory linear in `n`, gradients by JAX; `block_rows` and `custom_vjp` unused).

    The gradient in the weights `w` is exact where `w > 0` and 0 at padding (`w = 0`).
    """

    chunk_size: int = eqx.field(static=True, default=256)
    block_rows: int | None = eqx.field(static=True, default=None)
    custom_vjp: bool = eqx.field(static=True, default=True)
    causal: bool = eqx.field(static=True, default=False)
    memory_linear: ClassVar[bool] = True

    def fused_chunks(self):
        if self.causal or not self.custom_vjp:
            return None
        return self.chunk_size, self.block_rows

    def plain_softmax(self):
        return not self.causal

    def __check_init__(self):
        check_chunk_size(self.chunk_size)
        if self.block_rows is not None and self.block_rows < 1:
            raise InputError(
                f"block_rows must be >= 1 or None (automatic), got {self.block_rows}"
            )

    def __call__(
        self,
        x: Float[Array, "n d"],
        w: Float[Array, " n"],
        A: Float[Array, "M d d"],
        V: Float[Array, "M d d"],
    ) -> Float[Array, "n d"]:
        if self.causal:
            return _causal(x, w, A, V, self.chunk_size)
        if self.custom_vjp:
            return flash_attention(x, w, A, V, self.chunk_size, self.block_rows)
        return _forward(x, w, A, V, self.chunk_size, self.block_rows, native=False)[0]

    def velocity(self, x, w, A, V):
        """Streams over the sequences (`lax.map`, one at a time), so the cache-sized score blocks
        are not multiplied by `B`: faster on CPU and `B` times less temporary memory."""
        return map_sequences(self, x, w, A, V)


def map_sequences(kernel: AbstractKernel, x, w, A, V) -> Float[Array, "B n d"]:
    """`kernel` over the `B` sequences one at a time (`lax.map`): the temporaries of one sequence
    at a time, for the memory-linear kernels' `velocity`."""
    return jax.lax.map(lambda xw: kernel(xw[0], xw[1], A, V), (x, w))


def _causal(x, w, A, V, block):
    """Causal softmax attention of one sequence (`meanfield_tf._score_rows`)."""
    z = jnp.einsum("nd,mde->nme", x, A)
    lw = jnp.broadcast_to(log_weights(w), (A.shape[0], x.shape[0]))
    y = softmax_means(z, x, lw, causal=True, block=block)
    return jnp.einsum("med,nmd->ne", V, y) / A.shape[0]


def attention_velocity(
    kernel: AbstractKernel,
    x: Float[Array, "B n d"],
    w: Float[Array, "B n"],
    A: Float[Array, "M d d"],
    V: Float[Array, "M d d"],
) -> Float[Array, "B n d"]:
    """Head-averaged attention velocity of every token of every sequence: `kernel.velocity`."""
    return kernel.velocity(x, w, A, V)
