"""The NTK Gram of the finite transformer against independent references.

- a plain NumPy loop implementation of the finite transformer (Euler, one step per layer),
  differentiated by float64 central finite differences: K = L M J Jᵀ;
- at the symmetric zero-velocity initialisation, the closed forms
  K^V_ij = (1/LM) Σ m_i·m_j I and K^A_ij = |e|² (1/LM) Σ V H_i H_j Vᵀ with the tilted mean m and
  covariance H of each sequence at z = Aᵀe (computed by NumPy softmax sums).

All tests share one shape (B=2, n=3, d=2, L=2, M=2) so the Jacobian compiles once per output.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import meanfield_tf as mf

B, N, D, L, M = 2, 3, 2, 2, 2


def np_forward(A, V, x, w, e=None):
    """The finite transformer in NumPy loops; with a query e, return its final positions."""
    x = np.array(x, dtype=np.float64)
    w = np.array(w, dtype=np.float64)
    if e is not None:
        x = np.concatenate([x, np.broadcast_to(e, (x.shape[0], 1, x.shape[2]))], axis=1)
        w = np.concatenate([w, np.zeros((w.shape[0], 1))], axis=1)
    nl, nm = A.shape[:2]
    logw = np.where(w > 0, np.log(np.where(w > 0, w, 1.0)), -np.inf)
    for l in range(nl):
        vel = np.zeros_like(x)
        for b in range(x.shape[0]):
            for m in range(nm):
                for i in range(x.shape[1]):
                    s = np.array([x[b, i] @ A[l, m] @ x[b, j] for j in range(x.shape[1])]) + logw[b]
                    p = np.exp(s - s.max())
                    p /= p.sum()
                    vel[b, i] += V[l, m] @ (p @ x[b]) / nm
        x = x + vel / nl
    return x[:, -1, :] if e is not None else x


def fd_gram(A, V, x, w, e=None, h=1e-6):
    """L M J Jᵀ with J from central differences, per block."""
    def out(a, v):
        return np_forward(a, v, x, w, e).reshape(-1)

    jacs = {}
    for name, arr in (("A", A), ("V", V)):
        cols = []
        for idx in np.ndindex(arr.shape):
            plus, minus = arr.copy(), arr.copy()
            plus[idx] += h
            minus[idx] -= h
            args_p = (plus, V) if name == "A" else (A, plus)
            args_m = (minus, V) if name == "A" else (A, minus)
            cols.append((out(*args_p) - out(*args_m)) / (2 * h))
        jacs[name] = np.stack(cols, axis=1)
    grams = {k: L * M * j @ j.T for k, j in jacs.items()}
    grams["full"] = grams["A"] + grams["V"]
    return grams


@pytest.fixture
def problem(getkey):
    heads = mf.gaussian_heads(getkey(), L, M, D)
    x = jax.random.normal(getkey(), (B, N, D))
    w = jnp.array([[0.2, 0.3, 0.5], [0.5, 0.5, 0.0]])  # second sequence has a padding token
    return heads, mf.TokenBatch(x, w)


# FD error: truncation ~ h² |f'''| ≈ 1e-12 and rounding ~ eps |f| / h ≈ 2e-10, relative to
# O(1) entries of J; the Gram inherits ~1e-9 relative error. 1e-7 leaves a 100x margin.
FD_RTOL = 1e-7


@pytest.mark.parametrize("kind", ["query", "tokens"])
def test_gram_matches_finite_differences(problem, kind):
    heads, tokens = problem
    e = np.array([0.3, -0.7])
    output = mf.ReadoutQuery(e) if kind == "query" else mf.TokenOutputs()
    got = mf.ntk_blocks(heads, tokens, output=output)
    ref = fd_gram(np.asarray(heads.A), np.asarray(heads.V), tokens.x, tokens.w,
                  e if kind == "query" else None)
    p = B * D if kind == "query" else B * N * D
    for block in ("A", "V", "full"):
        assert got[block].gram.shape == (p, p)
        g, r = np.asarray(got[block].gram), ref[block]
        assert np.abs(g - r).max() <= FD_RTOL * np.abs(r).max(), block


def test_spectrum_is_the_grams(problem):
    heads, tokens = problem
    spec = mf.ntk_gram(heads, tokens, output=mf.ReadoutQuery(jnp.array([0.3, -0.7])), block="full")
    eig = np.linalg.eigvalsh(np.asarray(spec.gram))[::-1]
    lam = np.asarray(spec.eigenvalues)
    assert np.all(np.diff(lam) <= 0)
    assert np.abs(eig - lam).max() <= 1e-12 * lam[0]
    assert float(spec.lambda_max) == lam[0] and float(spec.lambda_min) == lam[-1]
    assert float(spec.condition) == pytest.approx(lam[0] / lam[-1], rel=1e-14)


def tilted(atoms, weights, z):
    """Tilted mean m(z) and covariance H(z) of a discrete measure (NumPy)."""
    s = atoms @ z + np.where(weights > 0, np.log(np.where(weights > 0, weights, 1.0)), -np.inf)
    p = np.exp(s - s.max())
    p /= p.sum()
    m = p @ atoms
    c = atoms - m
    return m, (p[:, None] * c).T @ c


def test_symmetric_init_closed_form(getkey, problem):
    """At zero velocity, the readout-query NTK is the LSE closed form (the criterion's basis)."""
    _, tokens = problem
    heads = mf.symmetric_heads(getkey(), L, M, D)
    e = np.array([0.3, -0.7])
    got = mf.ntk_blocks(heads, tokens, output=mf.ReadoutQuery(e))
    A, V = np.asarray(heads.A), np.asarray(heads.V)
    x, w = np.asarray(tokens.x), np.asarray(tokens.w)
    KA = np.zeros((B, D, B, D))
    KV = np.zeros((B, D, B, D))
    for l in range(L):
        for m in range(M):
            z = A[l, m].T @ e
            mh = [tilted(x[b], w[b], z) for b in range(B)]
            for i in range(B):
                for j in range(B):
                    KV[i, :, j, :] += mh[i][0] @ mh[j][0] * np.eye(D) / (L * M)
                    KA[i, :, j, :] += (e @ e) * V[l, m] @ mh[i][1] @ mh[j][1] @ V[l, m].T / (L * M)
    for block, ref in (("A", KA), ("V", KV)):
        ref = ref.reshape(B * D, B * D)
        assert np.abs(np.asarray(got[block].gram) - ref).max() <= 1e-12 * np.abs(ref).max()


def test_exact_lse_readout_closed_form(getkey):
    """The infinite-token zero-velocity readout: for Gaussians m = μ + Σz, H = Σ exactly."""
    heads = mf.symmetric_heads(getkey(), 1, 8, D)
    e = jnp.array([0.6, 0.8])
    mus = [np.array([0.5, -1.0]), np.array([1.0, 2.0])]
    covs = [np.array([[1.0, 0.3], [0.3, 0.5]]), np.array([[0.4, 0.0], [0.0, 2.0]])]
    fams = [mf.Gaussian(mu, c) for mu, c in zip(mus, covs)]
    jac = jax.jacrev(mf.zero_velocity_readout)(heads.params, fams, e)
    A, V = np.asarray(heads.A)[0], np.asarray(heads.V)[0]
    nm = A.shape[0]
    for i in range(2):
        for m in range(nm):
            z = A[m].T @ np.asarray(e)
            # dY_i/dV_m[a, b] = δ_{ia} (μ + Σz)_b / M
            ref_v = np.einsum("ab,c->abc", np.eye(D), mus[i] + covs[i] @ z) / nm
            np.testing.assert_allclose(np.asarray(jac["V"][i, :, 0, m]), ref_v, rtol=1e-13, atol=1e-15)
            # dY_i/dA_m[p, q] = (V Σ)_{:, q} e_p / M
            ref_a = np.einsum("aq,p->apq", V[m] @ covs[i], np.asarray(e)) / nm
            np.testing.assert_allclose(np.asarray(jac["A"][i, :, 0, m]), ref_a, rtol=1e-13, atol=1e-15)


def test_bad_inputs(problem):
    heads, tokens = problem
    with pytest.raises(mf.InputError, match="readout query"):
        mf.ntk_blocks(heads, tokens, output=mf.ReadoutQuery(jnp.ones(3)))
    with pytest.raises(mf.InputError, match="readout query"):
        mf.ReadoutQuery(jnp.ones((2, 2)))
    with pytest.raises(mf.InputError, match="unknown NTK block"):
        mf.ntk_gram(heads, tokens, output=mf.TokenOutputs(), block="Q")


def test_wide_jacobian_spectrum_is_exact_and_memory_light():
    """Many more parameters than outputs (the NTK of a wide model): the eigenvalues agree with
    NumPy's SVD, a near-dependent pair's tiny eigenvalue included, and the executable's memory
    stays O(F P) (a plain SVD of a (8, 131072) Jacobian asks XLA for 64 GiB of temporaries)."""
    from meanfield_tf._ntk import spectrum_from_jacobian

    rng = np.random.default_rng(3)
    jac = rng.standard_normal((8, 3000))
    jac[7] = jac[0] + 1e-9 * rng.standard_normal(3000)
    got = np.sort(np.asarray(spectrum_from_jacobian(jnp.asarray(jac, jnp.float64), 2.0).eigenvalues))
    want = np.sort(2.0 * np.linalg.svd(jac, compute_uv=False) ** 2)
    assert np.abs(got - want).max() <= 1e-13 * want.max()
    assert got[0] == pytest.approx(want[0], rel=1e-6)  # ~3e-15 of the top: kept, not squared away
    wide = jax.ShapeDtypeStruct((8, 131072), jnp.float32)
    stats = jax.jit(lambda j: spectrum_from_jacobian(j, 1.0).eigenvalues).lower(wide).compile()
    assert stats.memory_analysis().temp_size_in_bytes < 64 * 2**20
