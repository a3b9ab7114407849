r"""Sinkhorn attention: the attention matrix made (nearly) doubly stochastic, as in Sinkformers.

Per head $(A, V)$, with scores $S_{ij} = x_i^\top A x_j$ and the token weights $w$ as both
marginals, $K$ **iterations** are $K$ row normalisations with $K - 1$ column normalisations in
between, in the log domain (potentials $f$, $g$; start $g = 0$):

$$f_i = -\mathrm{LSE}_j\big(S_{ij} + g_j + \log w_j\big),\qquad
  g_j = -\mathrm{LSE}_i\big(S_{ij} + f_i + \log w_i\big),$$

ending with a row step, so that $P_{ij} = e^{S_{ij} + f_i + g_j}\, w_j$ has rows summing to 1 and,
as $K$ grows, column marginals $\sum_i w_i P_{ij} \to w_j$. The velocity is
$a_\theta[\mu](x_i) = V \sum_j P_{ij} x_j$. **One iteration is softmax attention exactly.**
Zero-weight tokens are exact padding: `-inf` as keys and no mass in the column sums (they still
move as queries). A causal mask is not offered: the column step makes every key's potential
depend on all queries, so a token's velocity would read the future.

**Gaussian limit.** For $\mu = N(m, \Sigma)$ the potentials stay quadratic. With
$g(y) = -\frac12 y^\top G y + h^\top y$ (start $G = 0$, $h = 0$) and $P = (\Sigma^{-1} + G)^{-1}$,
a row step gives $f(x) = -\frac12 x^\top (A P A^\top) x - x^\top A P (h + \Sigma^{-1} m) + \text{const}$;
a column step is the same with the roles swapped ($A^\top$ for $A$, $f$ for $g$). After the last
row step the row-normalised plan is Gaussian in $y$ with

$$E[y \mid x] = P(\Sigma^{-1} m + h + A^\top x) = (I + \Sigma G)^{-1}(m + \Sigma h + \Sigma A^\top x),$$

affine in $x$ (computed by linear solves with $I + \Sigma G$, no inverse of $\Sigma$). $K = 1$ gives
softmax's $m + \Sigma A^\top x$. As $K \to \infty$ (`sinkhorn_gaussian_limit`):
$E[y \mid x] = m + P A^\top (x - m)$ with $P = \Sigma^{1/2} R\, \Sigma^{1/2}$,
$R = 2\,(I + (I + 4E)^{1/2})^{-1}$, $E = \Sigma^{1/2} A^\top \Sigma A\, \Sigma^{1/2}$.
"""

from __future__ import annotations

from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from ._attention import AbstractKernel, map_sequences
from ._errors import InputError, check_chunk_size
from ._score_rows import log_normalisers, softmax_means
from ._tokens import log_weights


def _check_iterations(iterations: int) -> None:
    if not isinstance(iterations, int) or iterations < 1:
        raise InputError(f"Sinkhorn iterations must be an integer >= 1 (1 is softmax), got "
                         f"{iterations!r}")


class SinkhornKernel(AbstractKernel):
    """Dense Sinkhorn attention (module docstring): all `(M, n, n)` scores at once; the reference.

    **Fields:** `iterations` $K \\ge 1$ (default 3): row normalisations, with $K - 1$ column
    normalisations between them; `1` is softmax attention.
    """

    iterations: int = eqx.field(static=True, default=3)

    def __check_init__(self):
        _check_iterations(self.iterations)

    def __call__(
        self,
        x: Float[Array, "n d"],
        w: Float[Array, " n"],
        A: Float[Array, "M d d"],
        V: Float[Array, "M d d"],
    ) -> Float[Array, "n d"]:
        S = jnp.einsum("nd,mde,ke->mnk", x, A, x)
        lw = log_weights(w)

        def iteration(g, _):
            f = -jax.nn.logsumexp(S + (g + lw)[:, None, :], axis=-1)
            return -jax.nn.logsumexp(S + (f + lw)[:, :, None], axis=1), None

        g = jnp.zeros(S.shape[:2], S.dtype)
        if self.iterations > 1:
            g, _ = jax.lax.scan(iteration, g, None, length=self.iterations - 1)
        p = jax.nn.softmax(S + (g + lw)[:, None, :], axis=-1)
        return jnp.einsum("mnk,kd,med->ne", p, x, V) / A.shape[0]

    def gaussian_velocity(self, A, V, mean, cov):
        return sinkhorn_gaussian_velocity(A, V, mean, cov, self.iterations)


class ChunkedSinkhornKernel(AbstractKernel):
    """Memory-linear Sinkhorn attention: every row (column) step takes the queries (keys) in
    blocks of `chunk_size` against all tokens, the heads one at a time inside a block, each block
    and head rematerialised in the backward pass. Memory: one `(chunk_size, n)` score block plus
    the potentials `(K, M, n)`, linear in `n`. Gradients by JAX.

    **Fields:** `iterations` (as `SinkhornKernel`), `chunk_size` (default 256; need not divide `n`).
    """

    iterations: int = eqx.field(static=True, default=3)
    chunk_size: int = eqx.field(static=True, default=256)
    memory_linear: ClassVar[bool] = True

    def __check_init__(self):
        _check_iterations(self.iterations)
        check_chunk_size(self.chunk_size)

    def __call__(
        self,
        x: Float[Array, "n d"],
        w: Float[Array, " n"],
        A: Float[Array, "M d d"],
        V: Float[Array, "M d d"],
    ) -> Float[Array, "n d"]:
        lw = log_weights(w)
        c = self.chunk_size
        rows = jnp.einsum("nd,mde->nme", x, A)  # S_mij = rows_im · x_j
        cols = jnp.einsum("nd,med->nme", x, A)  # S_mij = cols_jm · x_i
        g = jnp.zeros(A.shape[:1] + x.shape[:1], x.dtype)  # (M, n)
        # a Python loop, not a scan: a scan over the iterations would store O(n^2) residuals
        for _ in range(self.iterations - 1):
            f = -log_normalisers(rows, x, g + lw, block=c).T
            g = -log_normalisers(cols, x, f + lw, block=c).T
        y = softmax_means(rows, x, g + lw, block=c)
        return jnp.einsum("med,nmd->ne", V, y) / A.shape[0]

    def velocity(self, x, w, A, V):
        """Streams over the sequences (`lax.map`): temporaries of one sequence at a time."""
        return map_sequences(self, x, w, A, V)

    def gaussian_velocity(self, A, V, mean, cov):
        return sinkhorn_gaussian_velocity(A, V, mean, cov, self.iterations)


def sinkhorn_gaussian_velocity(
    A: Float[Array, "M d d"],
    V: Float[Array, "M d d"],
    mean: Float[Array, " d"],
    cov: Float[Array, "d d"],
    iterations: int,
) -> tuple[Float[Array, "d d"], Float[Array, " d"]]:
    r"""`(B, c)`: the head-averaged velocity $v(x) = Bx + c$ of `iterations` Sinkhorn iterations on
    $N(m, \Sigma)$, from the quadratic potentials of the module docstring."""
    _check_iterations(iterations)
    eye = jnp.eye(mean.shape[0], dtype=cov.dtype)

    def head(a, v):
        def step(q, lin, a):  # one normalisation against g = -½ yᵀQy + linᵀy: (Q', lin')
            lhs = eye + cov @ q
            P = jnp.linalg.solve(lhs, cov)
            return a @ P @ a.T, -a @ jnp.linalg.solve(lhs, mean + cov @ lin)

        def iteration(carry, _):
            G, h = carry
            F, k = step(G, h, a)  # row step: f from g
            return step(F, k, a.T), None  # column step: g from f

        G, h = jnp.zeros_like(cov), jnp.zeros_like(mean)
        if iterations > 1:
            (G, h), _ = jax.lax.scan(iteration, (G, h), None, length=iterations - 1)
        lhs = eye + cov @ G
        return (v @ jnp.linalg.solve(lhs, cov @ a.T),
                v @ jnp.linalg.solve(lhs, mean + cov @ h))

    B, c = jax.vmap(head)(A, V)
    return B.mean(axis=0), c.mean(axis=0)


def _psd_function(mat, fn):
    """`fn` applied to the eigenvalues of the symmetric positive semi-definite `mat`."""
    evals, evecs = jnp.linalg.eigh((mat + mat.T) / 2)
    return (evecs * fn(jnp.clip(evals, 0))) @ evecs.T


def sinkhorn_gaussian_limit(
    A: Float[Array, "M d d"],
    V: Float[Array, "M d d"],
    mean: Float[Array, " d"],
    cov: Float[Array, "d d"],
) -> tuple[Float[Array, "d d"], Float[Array, " d"]]:
    r"""`(B, c)` of converged Sinkhorn attention ($K \to \infty$) on $N(m, \Sigma)$, in closed form:
    per head $E[y \mid x] = m + P A^\top (x - m)$ with $P = \Sigma^{1/2} R\, \Sigma^{1/2}$,
    $R = 2\,(I + (I + 4E)^{1/2})^{-1}$, $E = \Sigma^{1/2} A^\top \Sigma A\, \Sigma^{1/2}$."""
    root = _psd_function(cov, jnp.sqrt)
    eye = jnp.eye(mean.shape[0], dtype=cov.dtype)

    def head(a, v):
        E = root @ a.T @ cov @ a @ root
        R = 2 * jnp.linalg.inv(eye + _psd_function(eye + 4 * E, jnp.sqrt))
        slope = root @ R @ root @ a.T
        return v @ slope, v @ (mean - slope @ mean)

    B, c = jax.vmap(head)(A, V)
    return B.mean(axis=0), c.mean(axis=0)
