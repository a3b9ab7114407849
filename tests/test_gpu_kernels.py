"""The GPU-path kernels on CPU: `CudnnKernel` (XLA implementation) and `PallasKernel` (interpret mode).

References: `DenseKernel` in float64 (itself tested against explicit loops in test_attention.py).

"Equal to float32 rounding" is made precise by the float32 reference itself: a float32 kernel's
error against the float64 reference must be at most `FACTOR` times the error of the float32
`DenseKernel` (the same maths in plain float32), with a floor of `FLOOR_ULPS` float32 epsilons
for the case where the dense kernel is luckily exact. Both kernels reorder the same sums
(online rescaling, grouped heads), so their rounding is of the same order, not equal.

Sizes are tiny (interpret mode runs the Pallas grid in Python). Blocks are 16 (the smallest
Triton block, so the same tests run compiled on a GPU); n = 19 is prime, so both the two key
blocks (19 -> 32) and the `M n = 76` rows (-> 80) are ragged.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err

from meanfield_tf import (BF16, FLOAT32, TF32, CudnnKernel, DenseKernel, InputError,
                          PallasKernel, Precision)
from meanfield_tf._precision import precision_from_name

EPS32 = float(np.finfo(np.float32).eps)
FACTOR = 4.0
FLOOR_ULPS = 8.0


BLOCKS = dict(block_rows=16, block_keys=16)


def sequence(seed, n=19, d=3, m_heads=4, pad=(2, 5, 17), scale_A=2.0):
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
    batched = jax.jit(kernel.velocity)(x, w, A, V)
    for b in range(2):
        assert rel_err(batched[b], kernel(x[b], w[b], A, V)) <= FLOOR_ULPS * EPS32


def test_cudnn_branch_layout_and_padding_on_xla(monkeypatch):
    # The cuDNN branch pads the head dim to a multiple of 8 and n to even, and writes padding as
    # a finite -2^40 bias at full (B, 1, n, n) shape. Run that branch with the XLA implementation
    # underneath (cuDNN itself needs a GPU): the layout and the padding must be exact.
    real = jax.nn.dot_product_attention

    def xla_checking_shapes(q, k, v, *, implementation, **kw):
        assert implementation == "cudnn" and q.shape[-1] % 8 == 0 and q.shape[1] % 2 == 0
        assert kw["bias"].shape == (q.shape[0], 1, q.shape[1], q.shape[1])
        return real(q, k, v, implementation="xla", **kw)

    monkeypatch.setattr(jax.nn, "dot_product_attention", xla_checking_shapes)
    check_float32(CudnnKernel(implementation="cudnn"), sequence(12))  # n = 19, d = 3


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
    # rows M n = 76 -> 5 blocks of 16 (padded to 6 for 2 row splits), keys 19 -> 2 blocks of 16
    check_float32(PallasKernel(**BLOCKS, key_splits=2), sequence(3))


def test_pallas_kernel_float64_interpret_matches_dense():
    args = sequence(4)
    kernel = PallasKernel(**BLOCKS, interpret=True)
    assert rel_err(kernel(*args), DenseKernel()(*args)) <= 1e-12
    w = np.asarray(args[1])
    for name, a, b in zip("xwAV", grads(kernel, args), grads(DenseKernel(), args)):
        if name == "w":
            a, b = np.asarray(a)[w > 0], np.asarray(b)[w > 0]
        assert rel_err(a, b) <= 1e-12, name


def test_pallas_kernel_key_blocks_made_entirely_of_padding():
    # keys 0..15 (the whole first key block) and 32..39 (+ the ragged fill: the third block) are
    # padding: the running max is -inf for a whole block, then finite, then sees an all -inf block
    n = 40
    x, _, A, V = sequence(5, n=n, m_heads=1, pad=())
    w = np.zeros(n)
    w[16:32] = np.random.default_rng(6).uniform(0.2, 1.0, 16)
    check_float32(PallasKernel(**BLOCKS, key_splits=3), (x, jnp.asarray(w / w.sum()), A, V))


def test_pallas_kernel_jit_vmap_batch():
    seqs = [sequence(s) for s in (7, 8)]
    x, w = (jnp.stack([s[i] for s in seqs]) for i in (0, 1))
    A, V = seqs[0][2:]
    kernel = PallasKernel(block_rows=32, block_keys=16, interpret=True)
    got = jax.jit(kernel.velocity)(x, w, A, V)
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


def bf16_operand_reference(x, w, A, V):
    """Float64 attention whose score and value operands are rounded to bfloat16 as the policy says.

    Queries z = A^T x are formed in float32 and rounded, keys/values x rounded; everything else
    (scores, softmax, value sum, head mean) in float64.
    """
    rb = lambda a: np.asarray(jnp.asarray(a, jnp.float32).astype(jnp.bfloat16).astype(jnp.float64))
    z = rb(jnp.einsum("nd,mde->mne", x.astype(jnp.float32), A.astype(jnp.float32)))
    xb = rb(x)
    lw = np.where(np.asarray(w) > 0, np.log(np.where(np.asarray(w) > 0, np.asarray(w), 1)), -np.inf)
    s = np.einsum("mne,ke->mnk", z, xb) + lw
    p = np.exp(s - s.max(axis=-1, keepdims=True))
    y = np.einsum("mnk,ke->mne", p / p.sum(axis=-1, keepdims=True), xb)
    return np.einsum("med,mnd->ne", np.asarray(V), y) / A.shape[0]


@pytest.mark.parametrize("kernel", [CudnnKernel(precision=BF16), PallasKernel(**BLOCKS, precision=BF16)])
def test_bf16_policy_rounds_score_and_value_operands(kernel):
    # Against the float64 evaluation of the rounded operands, what is left is (a) the rounding of
    # the softmax weights p to bf16 before the value product, relative u = 2^-9 each, so
    # |dy| <= u max|x|, and (b) float32 accumulation of the d-term scores, |ds| <= d eps32 |z||x|,
    # a relative 2|ds| on p. Relative to max|v| the head mean multiplies by
    # cond = mean_m ||V_m|| max|x| / max|v|.
    args = sequence(9, n=16, d=8, pad=(2, 5))  # even n, d a multiple of 8: shapes cuDNN accepts on a GPU
    x, w, A, V = args
    d = x.shape[1]
    z = jnp.einsum("nd,mde->mne", x, A)
    smax = float(jnp.max(jnp.linalg.norm(z, axis=-1)) * jnp.max(jnp.linalg.norm(x, axis=-1)))
    emulated = bf16_operand_reference(*args)
    xmax = float(jnp.max(jnp.linalg.norm(x, axis=-1)))
    cond = float(jnp.mean(jnp.linalg.norm(V, ord=2, axis=(1, 2)))) * xmax / float(np.abs(emulated).max())
    bound = cond * (2.0**-9 + 2 * d * EPS32 * smax + FLOOR_ULPS * EPS32)
    got = kernel(*as32(args))
    assert rel_err(got, emulated) <= bound, (rel_err(got, emulated), bound)
    # and it really rounds: the exact (float64) result is much further away than float32 rounding
    assert rel_err(got, DenseKernel()(*args)) > 100 * EPS32


def test_tf32_is_float32_on_cpu():
    if jax.default_backend() == "gpu":
        pytest.skip("TF32 differs from float32 on GPUs")
    args = as32(sequence(10))
    assert rel_err(CudnnKernel(precision=TF32)(*args), CudnnKernel()(*args)) == 0.0


@pytest.mark.parametrize("policy", ["float32", "tf32", "bf16"])
def test_pallas_kernel_lowers_to_triton_for_cuda(policy):
    # Lowering for the CUDA platform runs the Pallas -> Triton IR translation on any machine:
    # the compiled (non-interpret) kernels, forward and backward, at a ragged size.
    kernel = PallasKernel(interpret=False, precision=precision_from_name(policy))
    x, w, A, V = as32(sequence(11, n=40, d=5, m_heads=3))
    loss = lambda x, w, A, V: jnp.sum(kernel(x, w, A, V) ** 2)
    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))
    text = grad.trace(x, w, A, V).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("xla.gpu.triton") == 3  # forward, query-gradient and key-gradient kernels
