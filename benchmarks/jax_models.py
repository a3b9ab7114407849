"""The JAX contenders: the same model (Euler, L layers of M heads, the finite transformer).

- `ours-dense` / `ours-chunked`: `meanfield_tf.flow` with `DenseKernel()` / `ChunkedKernel()`
  (gradient: checkpointed autodiff through diffrax; the chunked kernel's own VJP inside);
- `naive-jax`: what a researcher writes first — einsum scores, `jax.nn.softmax`, a Python loop
  over layers, `jax.grad`;
- `jax-dpa`: `jax.nn.dot_product_attention` (XLA implementation, one key/value head shared by
  the M query heads `z = A_m^T x`) inside the same Euler loop. It computes the softmax in float32.

Every contender exposes `velocity(x, w, A, V)`, `forward(A, V, x, w) -> x_1` and
`loss_and_grad(A, V, x, w) -> (loss, (dA, dV))`, loss `mean(|x_1|^2)`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

import meanfield_tf as mf
from meanfield_tf import attention_velocity


def _loss(x1):
    return jnp.mean(x1**2)


class Ours:
    def __init__(self, kernel):
        self.kernel = kernel

    def velocity(self, x, w, A, V):
        return attention_velocity(self.kernel, x, w, A[0], V[0])

    def forward(self, A, V, x, w):
        heads = mf.HeadMeasure(A=A, V=V, check=False)
        tokens = mf.TokenBatch(x, w, check=False)
        return mf.flow(heads, tokens, mf.DepthSolver(kernel=self.kernel)).x

    def loss_and_grad(self, A, V, x, w):
        return jax.value_and_grad(lambda A, V: _loss(self.forward(A, V, x, w)), argnums=(0, 1))(A, V)


def naive_velocity(x, w, A, V):
    s = jnp.einsum("bid,mde,bje->bmij", x, A, x) + jnp.log(w)[:, None, None, :]
    p = jax.nn.softmax(s, axis=-1)
    return jnp.einsum("bmij,bjd,med->bie", p, x, V) / A.shape[0]


def dpa_velocity(x, w, A, V):
    z = jnp.einsum("bnd,mde->bnme", x, A)  # (B, T, N, H): one query head per attention head
    kv = x[:, :, None, :]  # (B, S, 1, H): one key/value head shared by all (multi-query)
    bias = jnp.log(w)[:, None, None, :]
    y = jax.nn.dot_product_attention(z, kv, kv, bias=bias, scale=1.0, implementation="xla")
    return jnp.einsum("bnmd,med->bne", y, V) / A.shape[0]


class Loop:
    """An Euler loop over the L layers (a Python for-loop, unrolled by jit) around `field`."""

    def __init__(self, field):
        self.field = field

    def velocity(self, x, w, A, V):
        return self.field(x, w, A[0], V[0])

    def forward(self, A, V, x, w):
        L = A.shape[0]
        for layer in range(L):
            x = x + self.field(x, w, A[layer], V[layer]) / L
        return x

    def loss_and_grad(self, A, V, x, w):
        return jax.value_and_grad(lambda A, V: _loss(self.forward(A, V, x, w)), argnums=(0, 1))(A, V)


def contenders(chunk_size: int | None = None) -> dict:
    chunked = mf.ChunkedKernel() if chunk_size is None else mf.ChunkedKernel(chunk_size)
    return {
        "ours-dense": Ours(mf.DenseKernel()),
        "ours-chunked": Ours(chunked),
        "naive-jax": Loop(naive_velocity),
        "jax-dpa": Loop(dpa_velocity),
    }
