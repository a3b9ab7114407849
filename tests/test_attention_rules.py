"""The attention rules beyond softmax — causal mask, L2, Sinkhorn — against plain NumPy loops.

Every kernel (dense and memory-linear, chunk sizes that do not divide n) matches an independent
float64 loop implementation to 1e-12; gradients match central finite differences; padding is
exact; one Sinkhorn iteration is softmax; Sinkhorn's column marginals approach the weights; a
causal row never reads a future token.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from meanfield_tf import (
    ChunkedKernel,
    ChunkedL2Kernel,
    ChunkedSinkhornKernel,
    DenseKernel,
    L2Kernel,
    SinkhornKernel,
)
from meanfield_tf._errors import InputError

# ---------------------------------------------------------------------------------------------
# Independent references: plain loops over heads and query tokens, probabilities (not logs)


def _loop_softmax_like(x, w, A, V, score, causal):
    n, M = len(x), len(A)
    v = np.zeros_like(x)
    for i in range(n):
        for m in range(M):
            keys = [j for j in range(n) if w[j] > 0 and (not causal or j <= i)]
            if not keys:
                continue
            s = np.array([score(x[i], x[j], A[m]) + np.log(w[j]) for j in keys])
            p = np.exp(s - s.max())
            p /= p.sum()
            v[i] += V[m] @ sum(pk * x[j] for pk, j in zip(p, keys)) / M
    return v


def loop_softmax(x, w, A, V, causal=False):
    return _loop_softmax_like(x, w, A, V, lambda xi, xj, a: xi @ a @ xj, causal)


def loop_l2(x, w, A, V, causal=False):
    return _loop_softmax_like(x, w, A, V, lambda xi, xj, a: -(xi - xj) @ a @ (xi - xj), causal)


def loop_sinkhorn_plan(x, w, a, iterations):
    """The row-normalised plan P (n, n) of one head: scalings u (rows), c (columns), no logs."""
    n = len(x)
    kern = np.array([[np.exp(x[i] @ a @ x[j]) for j in range(n)] for i in range(n)])
    c = np.ones(n)
    for it in range(iterations):
        u = np.array([1.0 / sum(kern[i, j] * c[j] * w[j] for j in range(n)) for i in range(n)])
        if it < iterations - 1:
            c = np.array([1.0 / sum(w[i] * u[i] * kern[i, j] for i in range(n)) for j in range(n)])
    return np.array([[u[i] * kern[i, j] * c[j] * w[j] for j in range(n)] for i in range(n)])


def loop_sinkhorn(x, w, A, V, iterations):
    v = np.zeros_like(x)
    for m in range(len(A)):
        P = loop_sinkhorn_plan(x, w, A[m], iterations)
        v += (P @ x) @ V[m].T / len(A)
    return v


def problem(seed, n=11, d=3, M=2, pad=(3, 7), scale=0.5):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    w = rng.uniform(0.5, 1.5, size=n)
    w[list(pad)] = 0.0
    w /= w.sum()
    A = scale * rng.normal(size=(M, d, d))
    V = rng.normal(size=(M, d, d)) / np.sqrt(d)
    return x, w, A, V


def rel(a, b):
    return float(np.abs(np.asarray(a) - b).max() / np.abs(b).max())


CASES = [  # (kernel, reference) with chunk sizes 4 and 5 that do not divide n = 11
    (L2Kernel(), loop_l2),
    (ChunkedL2Kernel(4), loop_l2),
    (L2Kernel(causal=True), lambda *a: loop_l2(*a, causal=True)),
    (ChunkedL2Kernel(5, causal=True), lambda *a: loop_l2(*a, causal=True)),
    (DenseKernel(causal=True), lambda *a: loop_softmax(*a, causal=True)),
    (ChunkedKernel(4, causal=True), lambda *a: loop_softmax(*a, causal=True)),
    (SinkhornKernel(1), lambda *a: loop_sinkhorn(*a, 1)),
    (SinkhornKernel(4), lambda *a: loop_sinkhorn(*a, 4)),
    (ChunkedSinkhornKernel(4, chunk_size=4), lambda *a: loop_sinkhorn(*a, 4)),
    (ChunkedSinkhornKernel(2, chunk_size=5), lambda *a: loop_sinkhorn(*a, 2)),
]
IDS = [repr(k) for k, _ in CASES]


@pytest.mark.parametrize("kernel,reference", CASES, ids=IDS)
def test_kernel_matches_loop_reference(kernel, reference):
    x, w, A, V = problem(0)
    got = kernel(jnp.asarray(x), jnp.asarray(w), jnp.asarray(A), jnp.asarray(V))
    assert rel(got, reference(x, w, A, V)) <= 1e-12


def test_causal_row_with_only_padding_before_it_stays_still():
    x, w, A, V = problem(1, pad=(0, 1))
    for kernel in (DenseKernel(causal=True), ChunkedKernel(3, causal=True),
                   L2Kernel(causal=True), ChunkedL2Kernel(3, causal=True)):
        v = np.asarray(kernel(jnp.asarray(x), jnp.asarray(w), jnp.asarray(A), jnp.asarray(V)))
        assert np.all(np.isfinite(v)) and np.all(v[:2] == 0)


@pytest.mark.parametrize("kernel,reference", CASES[1::2], ids=IDS[1::2])
def test_gradients_match_central_differences(kernel, reference):
    """Directional derivatives in A, V, x and w (real tokens) of a scalar of the velocity."""
    x, w, A, V = (jnp.asarray(a) for a in problem(2, n=7, pad=(3,)))
    rng = np.random.default_rng(3)
    c = jnp.asarray(rng.normal(size=x.shape))

    @jax.jit
    def f(x, w, A, V):
        return jnp.sum(c * kernel(x, w, A, V))

    grads = jax.jit(jax.grad(f, argnums=(0, 1, 2, 3)))(x, w, A, V)
    args = [x, w, A, V]
    for k in range(4):
        d = jnp.asarray(rng.normal(size=args[k].shape))
        if k == 1:
            d = jnp.where(w > 0, d, 0)  # weights move on the real tokens only
        h = 1e-5
        plus = [a + h * d if i == k else a for i, a in enumerate(args)]
        minus = [a - h * d if i == k else a for i, a in enumerate(args)]
        fd = (f(*plus) - f(*minus)) / (2 * h)
        ad = jnp.sum(grads[k] * d)
        assert abs(float(ad - fd)) <= 1e-8 * max(1.0, abs(float(fd))), (k, float(ad), float(fd))
    assert float(jnp.abs(grads[1][3])) == 0.0  # padding is data, not a parameter


@pytest.mark.parametrize("kernel,reference", CASES, ids=IDS)
def test_padding_tokens_change_nothing(kernel, reference):
    """Zero-weight tokens appended at the end (after every real token, so a causal row of a
    real token does not see them either) leave the real tokens' velocities unchanged."""
    x, w, A, V = problem(4, pad=())
    rng = np.random.default_rng(5)
    xp = np.concatenate([x, 3 * rng.normal(size=(4, x.shape[1]))])
    wp = np.concatenate([w, np.zeros(4)])
    v = kernel(jnp.asarray(x), jnp.asarray(w), jnp.asarray(A), jnp.asarray(V))
    vp = kernel(jnp.asarray(xp), jnp.asarray(wp), jnp.asarray(A), jnp.asarray(V))
    assert rel(vp[: len(x)], np.asarray(v)) <= 1e-13


@pytest.mark.parametrize("kernel", [DenseKernel(causal=True), ChunkedKernel(4, causal=True),
                                    L2Kernel(causal=True), ChunkedL2Kernel(5, causal=True)],
                         ids=repr)
def test_causal_row_never_reads_a_future_token(kernel):
    x, w, A, V = (jnp.asarray(a) for a in problem(6))
    v = np.asarray(kernel(x, w, A, V))
    rng = np.random.default_rng(7)
    for i in (0, 4, 8):
        xf = x.at[i + 1:].add(jnp.asarray(rng.normal(size=x[i + 1:].shape)))
        wf = w.at[i + 1:].set(jnp.asarray(rng.uniform(0, 1, size=len(w) - i - 1)))
        vf = np.asarray(kernel(xf, wf, A, V))
        np.testing.assert_array_equal(vf[: i + 1], v[: i + 1])  # bitwise
        assert np.abs(vf[i + 1:] - v[i + 1:]).max() > 1e-3  # the future rows did move


def test_one_sinkhorn_iteration_is_softmax():
    x, w, A, V = (jnp.asarray(a) for a in problem(8, scale=1.0))
    for ref, sink in ((DenseKernel(), SinkhornKernel(1)),
                      (ChunkedKernel(4), ChunkedSinkhornKernel(1, chunk_size=4))):
        assert rel(sink(x, w, A, V), np.asarray(ref(x, w, A, V))) <= 1e-12


def test_sinkhorn_marginals():
    """With one head, V = I and d ≥ n, the plan is recovered from the velocity (P = v x⁺): rows
    sum to 1 for every K; the column marginals wᵀP approach w as K grows (and padding keys get
    exactly no mass)."""
    n, d = 6, 8
    x, w, A, _ = problem(9, n=n, d=d, M=1, pad=(2,), scale=0.25)
    V = np.eye(d)[None]
    errors = []
    for K in (1, 2, 4, 8, 32, 64):
        chunked = (ChunkedSinkhornKernel(K, chunk_size=4),) if K == 8 else ()
        for kernel in (SinkhornKernel(K),) + chunked:
            v = np.asarray(kernel(jnp.asarray(x), jnp.asarray(w), jnp.asarray(A), jnp.asarray(V)))
            P = v @ np.linalg.pinv(x)
            assert np.abs(P.sum(1) - 1).max() <= 1e-12
            assert np.abs(P[:, 2]).max() <= 1e-12
        errors.append(np.abs(w @ P - w).max())
    assert all(b < a for a, b in zip(errors, errors[1:])), errors
    assert errors[0] > 1e-1 and errors[-1] < 1e-13, errors


def test_kernels_refuse_bad_options():
    with pytest.raises(InputError, match="iterations"):
        SinkhornKernel(0)
    with pytest.raises(InputError, match="chunk_size"):
        ChunkedL2Kernel(0)
    assert DenseKernel(causal=True).fused_chunks() is None
    assert ChunkedKernel(8, causal=True).fused_chunks() is None
    assert ChunkedKernel(8).fused_chunks() == (8, None)
    for k in (L2Kernel(), ChunkedL2Kernel(), SinkhornKernel(), ChunkedSinkhornKernel()):
        assert k.fused_chunks() is None and not k.plain_softmax()
    assert ChunkedL2Kernel.memory_linear and ChunkedSinkhornKernel.memory_linear
    assert not L2Kernel.memory_linear and not SinkhornKernel.memory_linear


@pytest.mark.parametrize("kernel", [ChunkedL2Kernel(128, causal=True),
                                    ChunkedSinkhornKernel(3, 128),
                                    ChunkedKernel(128, causal=True)], ids=repr)
def test_memory_linear_kernels_keep_gradient_memory_linear(kernel):
    """XLA's temporary memory of the compiled gradient doubles (not quadruples) with n."""
    def temp(n):
        x, w, A = jnp.zeros((n, 4)), jnp.full((n,), 1.0 / n), jnp.zeros((2, 4, 4))
        f = jax.jit(jax.grad(lambda x, A: kernel(x, w, A, A).sum(), argnums=(0, 1)))
        return f.lower(x, A).compile().memory_analysis().temp_size_in_bytes

    small, large = temp(1024), temp(2048)
    assert large <= 2.3 * small, (small, large)
