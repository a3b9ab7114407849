"""The chunked kernel's custom backward pass against independent references, in float64.

References:

- a plain-NumPy forward (explicit max-shifted softmax over the positive-weight keys only, one
  head and one query at a time) and its float64 central finite differences;
- the dense kernel differentiated by JAX autodiff.

Tolerances. Dense and chunked evaluate the same sums in a different order (online rescaling,
block splits): their difference is a few float64 roundings per term, ~1e-15 relative, so 1e-12
is 1000× headroom. Central differences with step h have truncation error ~h²|f'''|/6 and
rounding error ~ε|f|/h; with h = 1e-5 and O(1) data both are below ~1e-10, so 1e-7 relative
leaves ample headroom while still catching any wrong term (a missing key/value/query role of x
changes the gradient at O(1)).
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import meanfield_tf as mf
from meanfield_tf import attention_velocity

from conftest import rel_err


def np_velocity(x, w, A, V):
    """v_i = (1/M) sum_m V_m sum_{j: w_j > 0} softmax_j(x_i^T A_m x_j + log w_j) x_j."""
    n, d = x.shape
    keep = w > 0
    xk, lw = x[keep], np.log(w[keep])
    out = np.zeros((n, d))
    for m in range(A.shape[0]):
        for i in range(n):
            s = xk @ (A[m].T @ x[i]) + lw
            p = np.exp(s - s.max())
            p /= p.sum()
            out[i] += V[m] @ (p @ xk)
    return out / A.shape[0]


def make(getkey, n, d, m_heads, zero=()):
    x = np.array(jax.random.normal(getkey(), (n, d)))
    A = np.asarray(jax.random.normal(getkey(), (m_heads, d, d))) / np.sqrt(d)
    V = np.asarray(jax.random.normal(getkey(), (m_heads, d, d))) / np.sqrt(d)
    w = np.array(jax.random.uniform(getkey(), (n,), minval=0.5, maxval=1.5))
    w[list(zero)] = 0.0
    w /= w.sum()
    g = np.asarray(jax.random.normal(getkey(), (n, d)))
    return x, w, A, V, g


@eqx.filter_jit
def vjp(kernel, x, w, A, V, g):
    _, pullback = jax.vjp(kernel, x, w, A, V)
    return pullback(g)


# n = 23 tokens: chunk sizes 1, 4, 5, 7 and 23+ do not all divide n; zero weights at the front
# (0..4: with chunk 5 the first chunk is all padding, the running max starts at -inf), in the
# middle (11) and a tail (18..22: an all-padding last chunk for chunk sizes 4 and 5).
PADDING = (0, 1, 2, 3, 4, 11, 18, 19, 20, 21, 22)
KERNELS = [
    mf.ChunkedKernel(1),
    mf.ChunkedKernel(4),
    mf.ChunkedKernel(5),
    mf.ChunkedKernel(7, block_rows=9),
    mf.ChunkedKernel(5, block_rows=1),
    mf.ChunkedKernel(23),
    mf.ChunkedKernel(64, block_rows=23),
    mf.ChunkedKernel(256),
    mf.ChunkedKernel(5, custom_vjp=False),
]


@pytest.mark.parametrize("kernel", KERNELS, ids=repr)
def test_chunked_matches_dense_and_numpy(getkey, kernel):
    x, w, A, V, g = make(getkey, 23, 3, 4, zero=PADDING)
    ref = np_velocity(x, w, A, V)
    dense = mf.DenseKernel()(x, w, A, V)
    out = kernel(x, w, A, V)
    assert rel_err(dense, ref) <= 1e-12
    assert rel_err(out, ref) <= 1e-12
    got = vjp(kernel, x, w, A, V, g)
    want = vjp(mf.DenseKernel(), x, w, A, V, g)
    for name, a, b in zip("xwAV", got, want):
        assert rel_err(a, b) <= 1e-12, name
    # padding: the weight cotangent is defined as 0 there
    assert np.all(np.asarray(got[1])[list(PADDING)] == 0)


def test_gradient_against_finite_differences(getkey):
    n, d, m_heads = 9, 3, 2
    x, w, A, V, g = make(getkey, n, d, m_heads, zero=(2, 7))
    kernel = mf.ChunkedKernel(4, block_rows=5)  # 3 key chunks (last one short), 4 row blocks
    got = vjp(kernel, x, w, A, V, g)
    h = 1e-5

    def fd(args, idx):
        grad = np.zeros_like(args[idx])
        for k in np.ndindex(args[idx].shape):
            plus = [a.copy() for a in args]
            minus = [a.copy() for a in args]
            plus[idx][k] += h
            minus[idx][k] -= h
            grad[k] = (np.sum(np_velocity(*plus) * g) - np.sum(np_velocity(*minus) * g)) / (2 * h)
        return grad

    args = [x, w, A, V]
    for idx, name in enumerate("xwAV"):
        want = fd(args, idx)
        have = np.asarray(got[idx])
        if name == "w":  # padding weights are data: only positive weights have a derivative
            keep = w > 0
            want, have = want[keep], have[keep]
        assert rel_err(have, want) <= 1e-7, name


def test_x_cotangent_sums_query_key_and_value_roles(getkey):
    """Split the three roles of x by hand and check the custom VJP returns their sum."""
    x, w, A, V, g = make(getkey, 11, 3, 3, zero=(4,))
    x = jnp.asarray(x)
    dense = mf.DenseKernel()

    def split(xq, xk, xv):  # queries xq, keys xk, values xv
        za = jnp.einsum("nd,mde->mne", xq, A)
        s = jnp.einsum("mne,ke->mnk", za, xk) + mf._attention.log_weights(jnp.asarray(w))
        p = jax.nn.softmax(s, axis=-1)
        return jnp.einsum("mnk,kd,med->ne", p, xv, V) / A.shape[0]

    assert rel_err(split(x, x, x), dense(x, w, A, V)) <= 1e-12
    roles = jax.jit(lambda x, g: jax.vjp(split, x, x, x)[1](g))(x, g)
    dx = vjp(mf.ChunkedKernel(4), x, w, A, V, g)[0]
    assert rel_err(dx, roles[0] + roles[1] + roles[2]) <= 1e-12
    for role in roles:  # each role matters: dropping one changes the gradient at O(1)
        assert rel_err(dx - role, dx) > 1e-3


def test_flow_gradient_chunked_equals_dense(getkey):
    """Through the whole Euler flow (a batch, streamed over sequences), gradients agree."""
    B, n, d, L, m_heads = 3, 10, 3, 2, 4
    x = jax.random.normal(getkey(), (B, n, d))
    w = jnp.ones((B, n)).at[1, 7:].set(0.0)
    w = w / w.sum(axis=1, keepdims=True)
    A = jax.random.normal(getkey(), (L, m_heads, d, d)) / np.sqrt(d)
    V = jax.random.normal(getkey(), (L, m_heads, d, d)) / np.sqrt(d)
    tokens = mf.TokenBatch(x, w)

    def loss(params, kernel):
        heads = mf.HeadMeasure(A=params[0], V=params[1], check=False)
        return jnp.sum(mf.flow(heads, tokens, mf.DepthSolver(kernel=kernel)).x ** 2)

    grad = eqx.filter_jit(jax.grad(loss))
    want = grad((A, V), mf.DenseKernel())
    got = grad((A, V), mf.ChunkedKernel(4, block_rows=7))
    for a, b in zip(got, want):
        assert rel_err(a, b) <= 1e-12
    v_batch = attention_velocity(mf.ChunkedKernel(3), x, w, A[0], V[0])
    v_dense = attention_velocity(mf.DenseKernel(), x, w, A[0], V[0])
    assert rel_err(v_batch, v_dense) <= 1e-12


def _grad_temp_bytes(kernel, n, m_heads=2, d=4):
    x = jnp.zeros((n, d), jnp.float32)
    w = jnp.full((n,), 1.0 / n, jnp.float32)
    A = jnp.zeros((m_heads, d, d), jnp.float32)

    def loss(x, A, V):
        return jnp.sum(kernel(x, w, A, V) ** 2)

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(x, A, A).compile()
    stats = compiled.memory_analysis()
    if stats is None:
        pytest.skip("this backend reports no memory analysis")
    return stats.temp_size_in_bytes


def test_gradient_memory_is_linear_in_n():
    """Dense autodiff stores (M, n, n) scores; the custom VJP stores O(M n d + r c)."""
    kernel = mf.ChunkedKernel(128, block_rows=256)
    small, large = _grad_temp_bytes(kernel, 1024), _grad_temp_bytes(kernel, 4096)
    dense = _grad_temp_bytes(mf.DenseKernel(), 4096)
    # 4x the tokens: at most ~4x the memory (linear), far below the dense gradient's n^2 growth
    assert large <= 5 * small
    assert dense >= 2 * 2 * 4096**2 * 4  # at least the (M, n, n) float32 probabilities, twice
    assert large <= dense / 20


def test_bad_chunk_sizes_raise():
    with pytest.raises(mf.InputError, match="chunk_size"):
        mf.ChunkedKernel(0)
    with pytest.raises(mf.InputError, match="block_rows"):
        mf.ChunkedKernel(8, block_rows=0)
