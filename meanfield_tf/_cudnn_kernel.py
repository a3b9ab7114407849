r"""Attention kernel through `jax.nn.dot_product_attention`: cuDNN flash attention on GPU.

The score of head $m$ is $x_i^\top A_m x_j + \log w_j = q_{mi}^\top x_j + \log w_j$ with the
query $q_{mi} = A_m^\top x_i$, and the values are the tokens themselves. Per layer this is
*grouped-query attention* with $M$ query heads sharing ONE key/value head:

    query  (B, n, M, d):  q[b, i, m] = A_m^T x_{b,i}
    key = value (B, n, 1, d):  x_{b,j}
    bias   (B, 1, 1, n) (XLA) or (B, 1, n, n) (cuDNN):  log w_{b,j}   (-inf / very negative at w = 0)
    scale  1

`dot_product_attention` returns the per-head means $y_{mi} = \sum_j p_{mij} x_j$; the kernel then
forms $v_i = \frac1M \sum_m V_m y_{mi}$ in float32 (or the input dtype when wider).

Which implementation runs (`implementation=None`): cuDNN when the default backend is a GPU and
the precision policy rounds operands to bfloat16 (cuDNN's fused attention takes only 16-bit
and 8-bit floats), XLA otherwise. `"xla"` / `"cudnn"` force one. cuDNN needs the bias at its full
`(B, 1, n, n)` shape (one per sequence, not per head): memory quadratic in `n`, and its gradient
is materialised at that shape too; padding there is `-2^40` (cuDNN mishandles `-inf`). cuDNN
also needs a head dim that is a multiple of 8 and, for the gradient with a bias, an even `n`: the
kernel pads the features with zeros and adds one zero-weight token when needed (both exact).

`jax.nn.dot_product_attention` computes its softmax in float32 even for float64 inputs: this
kernel is never a float64 reference; its accuracy is that of float32 (or of the policy).
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from ._errors import InputError
from ._attention import AbstractKernel
from ._precision import FLOAT32, Precision
from ._tokens import log_weights

_IMPLEMENTATIONS = (None, "xla", "cudnn")
_CUDNN_PAD = -(2.0**40)  # finite "minus infinity" of the cuDNN bias (bf16/fp16-representable)


class CudnnKernel(AbstractKernel):
    """Head-averaged attention as grouped-query `jax.nn.dot_product_attention` (M query heads, one KV head).

    **Fields:**

    - `implementation`: `None` (default: cuDNN on a GPU with 16-bit operands, XLA otherwise),
      `"xla"` or `"cudnn"` (forced; cuDNN fails on CPU and for float32/float64 operands).
    - `precision`: a `Precision` (default float32; `BF16` is what selects cuDNN on a GPU).

    `kernel(x, w, A, V)` is one sequence; `kernel.batch(x, w, A, V)` takes `(B, n, d)` / `(B, n)`
    natively (the attention call has a batch axis; no vmap over it).
    The gradient in the weights `w` is exact where `w > 0` and 0 at padding (`w = 0`).
    """

    implementation: str | None = eqx.field(static=True, default=None)
    precision: Precision = FLOAT32

    def plain_softmax(self):
        return True

    def __check_init__(self):
        if self.implementation not in _IMPLEMENTATIONS:
            raise InputError(
                f"CudnnKernel implementation must be None, 'xla' or 'cudnn', got {self.implementation!r}"
            )
        if not isinstance(self.precision, Precision):
            raise InputError(
                f"CudnnKernel precision must be a Precision (e.g. meanfield_tf FLOAT32, TF32, BF16), "
                f"got {type(self.precision).__name__}"
            )

    def resolved_implementation(self, dtype) -> str:
        """`"cudnn"` or `"xla"`: what runs for inputs of `dtype` on the default backend."""
        if self.implementation is not None:
            return self.implementation
        operand = self.precision.operand_dtype(dtype)
        on_gpu = jax.default_backend() == "gpu"
        return "cudnn" if on_gpu and operand in (jnp.bfloat16, jnp.float16) else "xla"

    def __call__(
        self,
        x: Float[Array, "n d"],
        w: Float[Array, " n"],
        A: Float[Array, "M d d"],
        V: Float[Array, "M d d"],
    ) -> Float[Array, "n d"]:
        return self.velocity(x[None], w[None], A, V)[0]

    def velocity(
        self,
        x: Float[Array, "B n d"],
        w: Float[Array, "B n"],
        A: Float[Array, "M d d"],
        V: Float[Array, "M d d"],
    ) -> Float[Array, "B n d"]:
        """The velocity of every token of `B` sequences (one attention call over the batch)."""
        B, n, d = x.shape
        m_heads = A.shape[0]
        acc = Precision.accumulate_dtype(x.dtype)
        op = self.precision.operand_dtype(x.dtype)
        impl = self.resolved_implementation(x.dtype)
        hi = jax.lax.Precision.HIGHEST
        # queries q[b, i, m] = A_m^T x_{b,i}: an (n d^2) product, kept at full precision
        q = jnp.einsum("bnd,mde->bnme", x, A, precision=hi)
        kv = x[:, :, None, :]
        lw = log_weights(w)
        if impl == "cudnn":
            # cuDNN's shapes: a head dim that is a multiple of 8, an even sequence length (with a
            # bias, for the gradient). Zero features change no score and no value; an extra token
            # of weight 0 is exact padding as a key, and its own (query) row is dropped.
            d_pad, n_pad = -d % 8, n % 2
            q = jnp.pad(q, ((0, 0), (0, n_pad), (0, 0), (0, d_pad)))
            kv = jnp.pad(kv, ((0, 0), (0, n_pad), (0, 0), (0, d_pad)))
            lw = jnp.pad(jnp.where(w > 0, lw, _CUDNN_PAD), ((0, 0), (0, n_pad)), constant_values=_CUDNN_PAD)
            bias = jnp.broadcast_to(lw[:, None, None, :], (B, 1, n + n_pad, n + n_pad)).astype(op)
        else:
            bias = lw[:, None, None, :].astype(acc)
        matmul = "tensorfloat32" if self.precision.matmul == "tf32" else "highest"
        with jax.default_matmul_precision(matmul):
            y = jax.nn.dot_product_attention(
                q.astype(op), kv.astype(op), kv.astype(op),
                bias=bias, scale=1.0, implementation=impl,
            )
        y = y[:, :n, :, :d].astype(acc)
        v = jnp.einsum("bnmd,med->bne", y, V.astype(acc), precision=hi) / m_heads
        return v.astype(x.dtype)
