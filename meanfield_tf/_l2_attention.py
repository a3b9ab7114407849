r"""L2 attention: scores are minus a squared distance between query and key (tied `Q = K`).

The Lipschitz variant of attention of Kim, Papamakarios and Mnih (2021) scores
$-|Q x_i - K x_j|^2$ with tied $Q = K$. With merged heads this is, per head $(A, V)$,

$$a_\theta[\mu](x_i) = V \sum_j \operatorname{softmax}_j\big(-(x_i - x_j)^\top A\,(x_i - x_j)
  + \log w_j\big)\, x_j ,$$

(no $1/\sqrt d$ temperature: it is absorbed in $A$, as for softmax). Only the symmetric part
$\tilde A = (A + A^\top)/2$ matters, and terms constant in $j$ cancel in the softmax, so the kernel
computes the equivalent score

$$s_{ij} = 2\, x_i^\top \tilde A x_j - x_j^\top \tilde A x_j + \log w_j .$$

With $A = Q^\top Q$ (positive semi-definite) a token attends to its neighbours. Padding is exact
(score `-inf`); `causal=True` restricts token `i` to keys `j ≤ i` in sequence order.

**Gaussian limit.** For $\mu = N(m, \Sigma)$ the tilted measure $\propto e^{b^\top y - y^\top\tilde A y}
\mu(dy)$, $b = 2\tilde A x$, is Gaussian with precision $\Sigma^{-1} + 2\tilde A$ (it must be
positive definite) and mean

$$(\Sigma^{-1} + 2\tilde A)^{-1}(\Sigma^{-1} m + 2\tilde A x) = (I + 2\Sigma\tilde A)^{-1}(m + 2\Sigma\tilde A x),$$

affine in $x$ (the second form needs no inverse of $\Sigma$): Gaussians stay Gaussian.
"""

from __future__ import annotations

from typing import ClassVar

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from ._attention import AbstractKernel, map_sequences
from ._errors import InputError, check_chunk_size, concrete_or_none
from ._score_rows import softmax_means
from ._tokens import log_weights


def _l2_rows(x, w, A):
    """Per head: queries `2 Ã x_i` `(n, M, d)` and key biases `log w_j - x_jᵀ Ã x_j` `(M, n)`."""
    sym = (A + jnp.swapaxes(A, -1, -2)) / 2
    z = 2 * jnp.einsum("nd,mde->nme", x, sym)
    bias = log_weights(w)[None, :] - jnp.einsum("nd,mde,ne->mn", x, sym, x)
    return z, bias


def _l2_velocity(x, w, A, V, causal, block):
    z, bias = _l2_rows(x, w, A)
    y = softmax_means(z, x, bias, causal=causal, block=block)
    return jnp.einsum("med,nmd->ne", V, y) / A.shape[0]


class L2Kernel(AbstractKernel):
    """Dense L2 attention (module docstring): all `(M, n, n)` scores at once; the reference.

    **Fields:** `causal`: token `i` attends to keys `j ≤ i` only (default `False`).
    """

    causal: bool = eqx.field(static=True, default=False)

    def __call__(
        self,
        x: Float[Array, "n d"],
        w: Float[Array, " n"],
        A: Float[Array, "M d d"],
        V: Float[Array, "M d d"],
    ) -> Float[Array, "n d"]:
        return _l2_velocity(x, w, A, V, self.causal, None)

    def gaussian_velocity(self, A, V, mean, cov):
        return _l2_gaussian(self, A, V, mean, cov)


class ChunkedL2Kernel(AbstractKernel):
    """Memory-linear L2 attention: query rows in blocks of `chunk_size` against all keys, heads
    one at a time inside a block, each block and head rematerialised in the backward pass (largest temporary one
    `(chunk_size, n)` score block, forward and gradient). Gradients by JAX.

    **Fields:** `chunk_size` (default 256; need not divide `n`), `causal` (default `False`).
    """

    chunk_size: int = eqx.field(static=True, default=256)
    causal: bool = eqx.field(static=True, default=False)
    memory_linear: ClassVar[bool] = True

    def __check_init__(self):
        check_chunk_size(self.chunk_size)

    def __call__(
        self,
        x: Float[Array, "n d"],
        w: Float[Array, " n"],
        A: Float[Array, "M d d"],
        V: Float[Array, "M d d"],
    ) -> Float[Array, "n d"]:
        return _l2_velocity(x, w, A, V, self.causal, self.chunk_size)

    def velocity(self, x, w, A, V):
        """Streams over the sequences (`lax.map`): temporaries of one sequence at a time."""
        return map_sequences(self, x, w, A, V)

    def gaussian_velocity(self, A, V, mean, cov):
        return _l2_gaussian(self, A, V, mean, cov)


def _l2_gaussian(kernel, A, V, mean, cov):
    """The head-averaged affine velocity `(B, c)` of L2 attention on `N(mean, cov)`; NaN where
    `Σ⁻¹ + 2Ã` is not positive definite (and `InputError` when the inputs are concrete)."""
    if kernel.causal:
        raise InputError("a causal mask has no Gaussian limit (the limit measure has no sequence "
                         "order); use causal=False for the Gaussian moment flow")
    sym = (A + jnp.swapaxes(A, -1, -2)) / 2
    d = mean.shape[0]
    # Σ⁻¹ + 2Ã ≻ 0  ⇔  I + 2 S Ã S ≻ 0 with S = Σ^{1/2} (also for a singular Σ on its range)
    evals, evecs = jnp.linalg.eigh((cov + cov.T) / 2)
    root = (evecs * jnp.sqrt(jnp.clip(evals, 0))) @ evecs.T
    lowest = jnp.linalg.eigvalsh(jnp.eye(d) + 2 * root @ sym @ root).min(axis=-1)  # (M,)
    low = concrete_or_none(lowest)
    if low is not None and np.any(low <= 0):
        raise InputError(
            f"L2 attention on N(m, Σ): the tilted precision Σ⁻¹ + 2Ã is not positive definite "
            f"(lowest eigenvalue of I + 2 Σ^1/2 Ã Σ^1/2 is {low.min():.3g} for head "
            f"{int(np.argmin(low))}); the Gaussian limit does not exist. Use heads whose "
            f"symmetric part is positive semi-definite (A = QᵀQ) or a smaller scale")
    lhs = jnp.eye(d) + 2 * jnp.einsum("ij,mjk->mik", cov, sym)  # I + 2ΣÃ
    slope = jnp.linalg.solve(lhs, 2 * jnp.einsum("ij,mjk->mik", cov, sym))
    shift = jnp.linalg.solve(lhs, jnp.broadcast_to(mean, (A.shape[0], d))[..., None])[..., 0]
    bad = jnp.any(lowest <= 0)
    B = jnp.einsum("mij,mjk->ik", V, slope) / A.shape[0]
    c = jnp.einsum("mij,mj->i", V, shift) / A.shape[0]
    return jnp.where(bad, jnp.nan, B), jnp.where(bad, jnp.nan, c)
