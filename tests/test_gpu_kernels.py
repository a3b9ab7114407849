"""The GPU-path kernels on CPU: `CudnnKernel` (XLA implementation) and `PallasKernel` (interpret mode).

References: `DenseKernel` in float64 (itself tested against explicit loops in test_attention.py).

"Equal to float32 rounding" is made precise by the float32 reference itself: a float32 kernel's
error against the float64 reference must be at most `FACTOR` times the error of the float32
`DenseKernel` (the same maths in plain float32), with a floor of `FLOOR_ULPS` float32 epsilons
for the case where the dense kernel is luckily exact. Both kernels reorder the same sums
(online rescaling, grouped heads), so their rounding is of the same order, not equal.

Sizes are tiny (interpret mode runs the Pallas grid in Python): n = 13 is prime, so with
`block_keys = 8` and `block_rows = 16` both the key blocks and the `M n` row blocks are ragged.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err

from meanfield_tf._attention import DenseKernel
from meanfield_tf._cudnn_kernel import CudnnKernel
from meanfield_tf._errors import InputError
from meanfield_tf._pallas_kernel import PallasKernel
from meanfield_tf._precision import BF16, FLOAT32, TF32, Precision, precision_from_name

EPS32 = float(np.finfo(np.float32).eps)
EPS_BF16 = 2.0**-8
FACTOR = 4.0
FLOOR_ULPS = 8.0


def sequence(seed, n=13, d=3, m_heads=4, pad=(2, 5), scale_A=2.0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    w = rng.uniform(0.1, 1.0, size=n)
    w[list(pad)] = 0.0
    w /= w.sum()
    A = scale_A * rng.normal(size=(m_heads, d, d)) / np.sqrt(d)
    V = rng.normal(size=(m_heads, d, d)) / np.sqrt(d)
    return tuple(jnp.asarray(a, jnp.float64) for a in (x, w, A, V))


def as32(args):
    return tuple(a.astype(jnp.float32) for a in args)


def risk(kernel, x, w, A, V):
    """A scalar whose gradient exercises every output entry with a different weight."""
    v = kernel(x, w, A, V)
    return jnp.sum(jnp.sin(v) * jnp.arange(1, v.size + 1, dtype=v.dtype).reshape(v.shape) / v.size)


def grads(kernel, args):
    return jax.grad(lambda *a: risk(kernel, *a), argnums=(0, 1, 2, 3))(*args)


def assert_float32_rounding(got32, ref64, dense32):
    """`got32` is as close to `ref64` as float32 dense attention is (see the module docstring)."""
    budget = FACTOR * max(rel_err(dense32, ref64), FLOOR_ULPS * EPS32)
    assert rel_err(got32, ref64) <= budget, (rel_err(got32, ref64), budget)


def check_float32(kernel, args64):
    args32 = as32(args64)
    ref, dense32 = DenseKernel()(*args64), DenseKernel()(*args32)
    got = kernel(*args32)
    assert got.dtype == jnp.float32 and got.shape == ref.shape
    assert_float32_rounding(got, ref, dense32)
    gref, gdense32, ggot = grads(DenseKernel(), args64), grads(DenseKernel(), args32), grads(kernel, args32)
    w = np.asarray(args64[1])
    for name, a, b, c in zip("xwAV", ggot, gref, gdense32):
        assert a.dtype == jnp.float32, name
        if name == "w":  # exact where w > 0, 0 at padding
            assert np.all(np.asarray(a)[w == 0] == 0)
            a, b, c = (np.asarray(t)[w > 0] for t in (a, b, c))
        assert_float32_rounding(a, b, c)


# --- CudnnKernel (the XLA implementation of jax.nn.dot_product_attention on CPU) ---------------


def test_cudnn_kernel_float32_values_and_gradients_with_padding():
    check_float32(CudnnKernel(), sequence(0))


def test_cudnn_kernel_batch_is_per_sequence():
    seqs = [sequence(s) for s in (1, 2)]
    x, w = (jnp.stack([s[i] for s in seqs]).astype(jnp.float32) for i in (0, 1))
    A, V = as32(seqs[0][2:])
    kernel = CudnnKernel()
    batched = jax.jit(kernel.batch)(x, w, A, V)
    for b in range(2):
        assert rel_err(batched[b], kernel(x[b], w[b], A, V)) <= FLOOR_ULPS * EPS32


def test_cudnn_kernel_picks_xla_on_cpu_and_rejects_bad_fields():
    assert CudnnKernel().resolved_implementation(jnp.float32) == "xla"
    assert CudnnKernel(precision=BF16).resolved_implementation(jnp.float32) == (
        "cudnn" if jax.default_backend() == "gpu" else "xla"
    )
    with pytest.raises(InputError, match="implementation"):
        CudnnKernel(implementation="flash")
    with pytest.raises(InputError, match="Precision"):
        CudnnKernel(precision="bf16")


# --- PallasKernel (interpret mode on CPU) -------------------------------------------------------


def test_pallas_kernel_float32_values_and_gradients_ragged_blocks_and_padding():
    # rows M n = 52 -> 4 blocks of 16 (padded), keys 13 -> 2 blocks of 8 (padded), 2 row splits
    check_float32(PallasKernel(block_rows=16, block_keys=8, key_splits=2), sequence(3))


def test_pallas_kernel_float64_interpret_matches_dense():
    args = sequence(4)
    kernel = PallasKernel(block_rows=16, block_keys=8, interpret=True)
    assert rel_err(kernel(*args), DenseKernel()(*args)) <= 1e-12
    w = np.asarray(args[1])
    for name, a, b in zip("xwAV", grads(kernel, args), grads(DenseKernel(), args)):
        if name == "w":
            a, b = np.asarray(a)[w > 0], np.asarray(b)[w > 0]
        assert rel_err(a, b) <= 1e-12, name


def test_pallas_kernel_key_blocks_made_entirely_of_padding():
    # keys 0..7 (the whole first key block) and 16..19 (the third) are padding: the running max
    # is -inf for a whole block, then finite, then sees an all -inf block again
    n = 22
    x, _, A, V = sequence(5, n=n, pad=())
    w = np.zeros(n)
    w[8:16] = np.random.default_rng(6).uniform(0.2, 1.0, 8)
    w[20:] = 0.5
    args = (x, jnp.asarray(w / w.sum()), A, V)
    kernel = PallasKernel(block_rows=16, block_keys=8, key_splits=3)
    assert rel_err(kernel(*args), DenseKernel()(*args)) <= 1e-12
    ga, gb = grads(kernel, args), grads(DenseKernel(), args)
    for name in (0, 2, 3):
        assert rel_err(ga[name], gb[name]) <= 1e-12
    assert np.all(np.asarray(ga[1])[w == 0] == 0)


def test_pallas_kernel_jit_vmap_batch():
    seqs = [sequence(s) for s in (7, 8)]
    x, w = (jnp.stack([s[i] for s in seqs]) for i in (0, 1))
    A, V = seqs[0][2:]
    kernel = PallasKernel(block_rows=32, block_keys=16)
    got = jax.jit(kernel.batch)(x, w, A, V)
    for b in range(2):
        assert rel_err(got[b], DenseKernel()(x[b], w[b], A, V)) <= 1e-12


def test_pallas_kernel_rejects_bad_blocks():
    with pytest.raises(InputError, match="block_keys"):
        PallasKernel(block_keys=0)
    with pytest.raises(InputError, match="power of two"):
        PallasKernel(block_rows=24, interpret=False)(*as32(sequence(0)))


# --- Precision policy ---------------------------------------------------------------------------


def test_precision_names_and_errors():
    assert precision_from_name("float32") == FLOAT32 == Precision()
    assert precision_from_name("tf32") == TF32 and TF32.name == "tf32"
    assert precision_from_name(BF16) is BF16
    with pytest.raises(InputError, match="unknown precision"):
        precision_from_name("fp8")
    with pytest.raises(InputError, match="operands"):
        Precision(operands="float16")


@pytest.mark.parametrize("kernel", [CudnnKernel(precision=BF16), PallasKernel(block_rows=16, block_keys=8, precision=BF16)])
def test_bf16_operands_error_is_bfloat16_rounding(kernel):
    # score operands rounded to bf16: each score moves by <= 2 eps_bf16 |z| |x| (both operands
    # rounded), so each softmax weight by a relative 2 max|ds|; the value operands add eps_bf16.
    # Relative to max|v|, the head mean amplifies by cond = (1/M) sum_m |V_m| max|y| / max|v|.
    args = sequence(9)
    x, w, A, V = args
    z = jnp.einsum("nd,mde->mne", x, A)
    smax = float(jnp.max(jnp.linalg.norm(z, axis=-1)) * jnp.max(jnp.linalg.norm(x, axis=-1)))
    ref = DenseKernel()(*args)
    scale = float(jnp.mean(jnp.linalg.norm(V, ord=2, axis=(1, 2))) * jnp.max(jnp.linalg.norm(x, axis=-1)))
    cond = scale / float(jnp.max(jnp.abs(ref)))
    bound = EPS_BF16 * (4 * smax + 2) * cond
    err = rel_err(kernel(*as32(args)), ref)
    assert err <= bound, (err, bound)
    assert err > 10 * EPS32  # it really rounds to bf16


def test_tf32_is_float32_on_cpu():
    if jax.default_backend() == "gpu":
        pytest.skip("TF32 differs from float32 on GPUs")
    args = as32(sequence(10))
    assert rel_err(CudnnKernel(precision=TF32)(*args), CudnnKernel()(*args)) == 0.0
