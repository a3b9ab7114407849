"""Acceptance tests of the attention kernels against a plain-NumPy reference.

The reference evaluates, for one sequence and `M` heads,

    v(x_i) = (1/M) sum_m V_m sum_j softmax_j(x_i^T A_m x_j + log w_j) x_j

by explicit loops over heads and queries, with a max-shifted softmax taken over the tokens of
positive weight only: padding is excluded by construction, not through a -inf score.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err

import meanfield_tf as mf
from meanfield_tf import attention_velocity

EPS64 = np.finfo(np.float64).eps
EPS32 = np.finfo(np.float32).eps


def np_velocity(x, w, A, V):
    """Plain-NumPy head-averaged attention velocity of one sequence, in float64."""
    x, w, A, V = (np.asarray(a, np.float64) for a in (x, w, A, V))
    keys = np.flatnonzero(w > 0)
    out = np.zeros_like(x)
    for m in range(A.shape[0]):
        for i in range(x.shape[0]):
            s = np.array([x[i] @ A[m] @ x[j] + np.log(w[j]) for j in keys])
            p = np.exp(s - s.max())
            p /= p.sum()
            out[i] += V[m] @ (p @ x[keys])
    return out / A.shape[0]


def random_sequence(rng, n, d, m_heads, *, num_pad=0, scale_A=1.0, dtype=np.float64):
    """Random tokens, non-uniform weights with `num_pad` zero weights at random places, heads."""
    x = rng.normal(size=(n, d))
    w = rng.uniform(0.1, 1.0, size=n)
    w[rng.choice(n, num_pad, replace=False)] = 0.0
    w /= w.sum()
    A = scale_A * rng.normal(size=(m_heads, d, d)) / np.sqrt(d)
    V = rng.normal(size=(m_heads, d, d)) / np.sqrt(d)
    return tuple(jnp.asarray(a, dtype) for a in (x, w, A, V))


@pytest.mark.parametrize("num_pad", [0, 4])
def test_dense_matches_numpy(num_pad):
    rng = np.random.default_rng(0)
    x, w, A, V = random_sequence(rng, 13, 3, 4, num_pad=num_pad, scale_A=2.0)
    got = mf.DenseKernel()(x, w, A, V)
    assert rel_err(got, np_velocity(x, w, A, V)) <= 1e-12


@pytest.mark.parametrize("chunk_size", [1, 4, 13, 64])
def test_chunked_matches_dense_and_numpy(chunk_size):
    # n = 13 is prime: chunk size 4 leaves a ragged (padded) last chunk; 64 > n is one chunk.
    rng = np.random.default_rng(1)
    x, w, A, V = random_sequence(rng, 13, 3, 4, num_pad=5, scale_A=2.0)
    dense = mf.DenseKernel()(x, w, A, V)
    chunked = mf.ChunkedKernel(chunk_size)(x, w, A, V)
    assert rel_err(chunked, dense) <= 1e-12
    assert rel_err(chunked, np_velocity(x, w, A, V)) <= 1e-12


@pytest.mark.parametrize("chunk_size", [2, 3, 4])
def test_chunked_with_chunks_made_entirely_of_padding(chunk_size):
    # Tokens 0..7 are padding: the first chunks see only -inf scores (running max still -inf),
    # then the real keys arrive; a block of padding in the middle gives all-padding chunks after
    # the running max is finite.
    rng = np.random.default_rng(2)
    n, d = 22, 3
    x, _, A, V = random_sequence(rng, n, d, 3, scale_A=1.5)
    w = np.zeros(n)
    w[8:12] = rng.uniform(0.2, 1.0, 4)
    w[20:] = rng.uniform(0.2, 1.0, 2)
    w = jnp.asarray(w / w.sum())
    dense = mf.DenseKernel()(x, w, A, V)
    chunked = mf.ChunkedKernel(chunk_size)(x, w, A, V)
    assert np.isfinite(np.asarray(chunked)).all()
    assert rel_err(chunked, dense) <= 1e-12
    assert rel_err(dense, np_velocity(x, w, A, V)) <= 1e-12


@pytest.mark.parametrize("kernel", [mf.DenseKernel(), mf.ChunkedKernel(3)])
def test_batched_velocity_is_per_sequence(kernel):
    rng = np.random.default_rng(3)
    seqs = [random_sequence(rng, 7, 2, 3, num_pad=b) for b in range(3)]
    x = jnp.stack([s[0] for s in seqs])
    w = jnp.stack([s[1] for s in seqs])
    A, V = seqs[0][2], seqs[0][3]
    got = attention_velocity(kernel, x, w, A, V)
    for b in range(3):
        assert rel_err(got[b], np_velocity(x[b], w[b], A, V)) <= 1e-12


@pytest.mark.parametrize("kernel", [mf.DenseKernel(), mf.ChunkedKernel(4)])
def test_float32_large_scores_do_not_overflow(kernel):
    # Scores x_i^T A x_j ~ 1e3 with O(1) differences: exp(score) overflows float32 (max ~ e^88),
    # so only a max-shifted (online) softmax gives a finite answer.
    rng = np.random.default_rng(4)
    n, d = 11, 4
    x = np.concatenate([np.full((n, 1), 32.0), rng.normal(size=(n, d - 1))], axis=1)
    w = rng.uniform(0.1, 1.0, n)
    w[[2, 7]] = 0.0
    w /= w.sum()
    A = np.broadcast_to(np.eye(d), (2, d, d)) + 0.1 * rng.normal(size=(2, d, d))
    V = rng.normal(size=(2, d, d)) / np.sqrt(d)
    x32, w32, A32, V32 = (jnp.asarray(a, jnp.float32) for a in (x, w, A, V))
    got = kernel(x32, w32, A32, V32)
    assert got.dtype == jnp.float32
    assert np.isfinite(np.asarray(got)).all()
    # Reference in float64 on the very same (float32-rounded) inputs. A float32 score of size S
    # carries an absolute rounding error of about (d + 2) S eps32 (a length-d dot product of a
    # product); the softmax turns an absolute score error delta into a relative weight error of at
    # most 2 delta, so the output is off by at most ~2 (d + 2) S eps32 relative (plus O(d eps32)).
    ref = np_velocity(x32, w32, A32, V32)
    smax = float(np.abs(np.einsum("nd,mde,ke->mnk", x, A, x)).max())
    assert smax > 500.0
    tol = 2 * (d + 2) * smax * EPS32
    assert rel_err(got, ref) <= tol


@pytest.mark.parametrize("kernel", [mf.DenseKernel(), mf.ChunkedKernel(3)])
def test_padding_keys_change_nothing(kernel):
    # Insert zero-weight tokens at random places with arbitrary (even huge) positions: the other
    # tokens' velocities are unchanged to rounding.
    rng = np.random.default_rng(5)
    n, d = 9, 3
    x, w, A, V = random_sequence(rng, n, d, 3, num_pad=2, scale_A=2.0)
    base = kernel(x, w, A, V)
    num_new = 6
    scales = np.array([1.0, 1.0, 10.0, 10.0, 1e3, 1e3])[:, None]
    new_pos = jnp.asarray(rng.normal(size=(num_new, d)) * scales)
    order = rng.permutation(n + num_new)
    x_all = jnp.concatenate([x, new_pos])[order]
    w_all = jnp.concatenate([w, jnp.zeros(num_new)])[order]
    got = kernel(x_all, w_all, A, V)
    inv = np.argsort(order)[:n]  # where each original token went
    assert np.isfinite(np.asarray(got)).all()
    assert rel_err(got[inv], base) <= 1e-13


def test_chunked_gradient_matches_dense_with_padding():
    rng = np.random.default_rng(6)
    x, w, A, V = random_sequence(rng, 10, 3, 2, num_pad=3, scale_A=1.5)
    ct = jnp.asarray(rng.normal(size=(10, 3)))

    def loss(kernel):
        return lambda x, A, V: jnp.sum(ct * kernel(x, w, A, V))

    g_dense = jax.grad(loss(mf.DenseKernel()), argnums=(0, 1, 2))(x, A, V)
    g_chunk = jax.grad(loss(mf.ChunkedKernel(4)), argnums=(0, 1, 2))(x, A, V)
    for a, b in zip(g_chunk, g_dense):
        assert np.isfinite(np.asarray(a)).all()
        assert rel_err(a, b) <= 1e-12
