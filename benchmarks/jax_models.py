"""The JAX contenders: the same model (Euler, L layers of M heads, the finite transformer).

- `ours-dense` / `ours-chunked`: `meanfield_tf.flow` with `DenseKernel()` / `ChunkedKernel()`
  (gradient: checkpointed autodiff through diffrax; the chunked kernel's own VJP inside);
- `ours-fused`: the gradient path `risk_and_gradient` and training take for the finite
  transformer — `meanfield_tf.euler_flow`, one custom-VJP Euler step per layer whose backward
  recomputes each score block once (no forward re-run, memory linear in `n`); its forward is the
  same chunked online-LSE pass; keys in one chunk up to n = 1024, 512-key chunks above;
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
from meanfield_tf import attention_velocity, native_kernels


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


def fused_chunk(n: int) -> int | None:
    """The fused path's keys per chunk (measured on 2 cores: one chunk of all keys at n = 256,
    512-key chunks at n = 4096 are ~20% faster in the forward than one 4096-key chunk)."""
    return None if n <= 1024 else 512


class Fused:
    """The fused discrete adjoint: `euler_flow` forward, `jax.value_and_grad` through it.

    `mode`: the native CPU kernel's mode while the contender is traced — `"auto"` (the default
    path: the native kernel on the CPU when it builds) or `"off"` (XLA's blocks, for reference).
    """

    def __init__(self, mode: str = "auto"):
        self.mode = mode

    def velocity(self, x, w, A, V):
        with native_kernels(self.mode):
            return attention_velocity(mf.ChunkedKernel(fused_chunk(x.shape[1]) or x.shape[1]),
                                      x, w, A[0], V[0])

    def forward(self, A, V, x, w):
        heads = mf.HeadMeasure(A=A, V=V, check=False)
        with native_kernels(self.mode):
            return mf.euler_flow(heads, x, w, chunk_size=fused_chunk(x.shape[1]))

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
        "ours-fused": Fused(),
        "ours-fused-xla": Fused("off"),
        "naive-jax": Loop(naive_velocity),
        "jax-dpa": Loop(dpa_velocity),
    }
