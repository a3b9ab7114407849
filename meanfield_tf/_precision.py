r"""Precision policy of the attention kernels: how the score and value products are computed.

An attention kernel does two kinds of products per (head, query, key) triple: the score
$s_{mij} = z_{mi}^\top x_j$ (with $z_{mi} = A_m^\top x_i$) and the value product
$\sum_j p_{mij} x_j$. A `Precision` says in which arithmetic they run. In every policy the
products *accumulate* in float32 (or in the input dtype when that is wider), the softmax
(max, exp, normaliser) is float32, and the head mean $\frac1M\sum_m V_m y_m$ and the Euler
residual $X + \frac1L v$ stay in the input dtype.

Three policies (`PRECISIONS`, by name):

- `"float32"` (default, `Precision()`): operands in the input dtype, matmuls at
  `lax.Precision.HIGHEST` (true float32 on GPUs, whose default for float32 is TF32).
- `"tf32"`: float32 operands, matmuls at `lax.Precision.HIGH` (TensorFloat-32 tensor cores on
  NVIDIA Ampere and later: 10-bit mantissa operands, float32 accumulation). On CPU this is
  plain float32 — the CPU backend has no TF32, so its measured error there is that of float32.
- `"bf16"`: score and value operands rounded to bfloat16 (8-bit mantissa), products
  accumulated in float32; the scores themselves, the exp and the normaliser are float32.
  On CPU bfloat16 is emulated (rounded operands, float32 arithmetic): the same rounding as a
  GPU, slower.

Measured error of each against float64 on a standard case: `docs/gpu.md`.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array

from ._errors import InputError

_OPERANDS = ("input", "bfloat16")
_MATMULS = ("highest", "tf32")


class Precision(eqx.Module):
    """Arithmetic of the kernel's products (see the module docstring).

    **Fields:**

    - `operands`: `"input"` (keep the input dtype) or `"bfloat16"` (round the operands of the
      score and value products to bfloat16).
    - `matmul`: `"highest"` (full-precision float32 products) or `"tf32"` (TensorFloat-32 on
      GPUs that have it; float32 elsewhere).
    """

    operands: str = eqx.field(static=True, default="input")
    matmul: str = eqx.field(static=True, default="highest")

    def __check_init__(self):
        if self.operands not in _OPERANDS:
            raise InputError(f"Precision.operands must be one of {_OPERANDS}, got {self.operands!r}")
        if self.matmul not in _MATMULS:
            raise InputError(f"Precision.matmul must be one of {_MATMULS}, got {self.matmul!r}")

    @property
    def name(self) -> str:
        """The policy's name in `PRECISIONS` (`"float32"`, `"tf32"`, `"bf16"`), or a description."""
        for key, value in PRECISIONS.items():
            if value == self:
                return key
        return f"operands={self.operands},matmul={self.matmul}"

    @property
    def lax_precision(self) -> jax.lax.Precision:
        """The `precision=` of the products: `HIGHEST` for float32, `HIGH` (TF32 on GPUs) for tf32."""
        return jax.lax.Precision.HIGH if self.matmul == "tf32" else jax.lax.Precision.HIGHEST

    def operand_dtype(self, dtype) -> jnp.dtype:
        """The dtype the score and value operands are rounded to, for inputs of `dtype`."""
        return jnp.dtype(jnp.bfloat16) if self.operands == "bfloat16" else jnp.dtype(dtype)

    @staticmethod
    def accumulate_dtype(dtype) -> jnp.dtype:
        """float32, or the input dtype when it is wider (float64 inputs accumulate in float64)."""
        return jnp.promote_types(jnp.dtype(dtype), jnp.float32)

    def cast(self, a: Array) -> Array:
        """`a` rounded to this policy's operand dtype (no-op for `operands="input"`)."""
        return a.astype(self.operand_dtype(a.dtype))

    def dot(self, a: Array, b: Array, acc_dtype) -> Array:
        """`a @ b` with operands rounded per policy, accumulated in `acc_dtype`."""
        a = a.astype(self.operand_dtype(a.dtype))
        b = b.astype(self.operand_dtype(b.dtype))
        return jnp.dot(a, b, precision=self.lax_precision, preferred_element_type=acc_dtype)

    def einsum(self, spec: str, a: Array, b: Array, acc_dtype) -> Array:
        """`jnp.einsum(spec, a, b)` with operands rounded per policy, accumulated in `acc_dtype`."""
        a = a.astype(self.operand_dtype(a.dtype))
        b = b.astype(self.operand_dtype(b.dtype))
        return jnp.einsum(spec, a, b, precision=self.lax_precision, preferred_element_type=acc_dtype)


FLOAT32 = Precision()
TF32 = Precision(matmul="tf32")
BF16 = Precision(operands="bfloat16")

PRECISIONS: dict[str, Precision] = {"float32": FLOAT32, "tf32": TF32, "bf16": BF16}


def precision_from_name(name: str | Precision) -> Precision:
    """The `Precision` called `name` (`"float32"`, `"tf32"`, `"bf16"`); a `Precision` passes through."""
    if isinstance(name, Precision):
        return name
    try:
        return PRECISIONS[name]
    except KeyError:
        raise InputError(
            f"unknown precision {name!r}: use one of {', '.join(PRECISIONS)}"
        ) from None
