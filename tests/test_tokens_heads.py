"""Token families (exact log-sum-exp and samplers), token batches and head measures.

Each family's `.lse(z) = log E_mu[exp <z, y>]` is checked against an independent evaluation:
closed forms, tensor Gauss quadrature in NumPy, and Monte Carlo over the family's own sampler
(which checks the sampler too).
"""

import equinox as eqx
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err
from scipy import special

import meanfield_tf as mf

# one compiled call per family and shape (cheaper than compiling each eager op of `.lse`)
lse = eqx.filter_jit(lambda family, z: family.lse(jnp.asarray(z)))

Z2 = np.array([[0.0, 0.0], [0.7, -0.3], [-1.5, 2.0], [3.0, 0.5], [1e-7, -2e-6]])


def gauss_hermite_lse(z, mean, cov, num=40):
    """log E exp<z, y>, y ~ N(mean, cov) in d = 2, by tensor Gauss-Hermite quadrature."""
    t, wt = np.polynomial.hermite_e.hermegauss(num)  # weight exp(-t^2 / 2)
    wt = wt / np.sqrt(2 * np.pi)
    chol = np.linalg.cholesky(cov)
    xi = np.stack(np.meshgrid(t, t, indexing="ij"), -1).reshape(-1, 2)
    ww = np.outer(wt, wt).reshape(-1)
    y = mean + xi @ chol.T
    return special.logsumexp(z @ y.T, b=ww, axis=-1)


def test_discrete_lse_ignores_zero_weights():
    atoms = np.array([[0.0, 1.0], [2.0, -1.0], [-1.0, 0.5], [50.0, 50.0]])
    w = np.array([0.2, 0.5, 0.3, 0.0])
    fam = mf.Discrete(atoms, w)
    expected = np.log(np.exp(Z2 @ atoms[:3].T) @ w[:3])
    assert rel_err(lse(fam, Z2), expected) <= 1e-14
    x, wt = fam.tokens(None, 6)  # padded to 6 tokens with zero weights
    assert x.shape == (6, 2) and np.asarray(wt)[3:].sum() == 0.0


def test_gaussian_lse_matches_quadrature():
    mean = np.array([0.3, -0.8])
    cov = np.array([[1.0, 0.4], [0.4, 0.5]])
    got = lse(mf.Gaussian(mean, cov), Z2)
    assert rel_err(got, gauss_hermite_lse(Z2, mean, cov)) <= 1e-12


def test_gaussian_mixture_lse_matches_quadrature():
    pis = np.array([0.3, 0.7])
    means = np.array([[1.0, 0.0], [-0.5, 0.5]])
    covs = np.array([[[0.5, 0.1], [0.1, 0.3]], [[0.2, 0.0], [0.0, 0.8]]])
    got = lse(mf.GaussianMixture(pis, means, covs), Z2)
    per = np.stack([gauss_hermite_lse(Z2, m, c) for m, c in zip(means, covs)], -1)
    assert rel_err(got, special.logsumexp(per, b=pis, axis=-1)) <= 1e-12


def test_uniform_box_lse_matches_quadrature():
    low, high = np.array([-1.0, 0.5]), np.array([2.0, 1.0])
    z = np.concatenate([Z2, [[30.0, -40.0], [-1e-5, 3e-4]]])
    t, wt = np.polynomial.legendre.leggauss(80)
    grids = [(lo + hi) / 2 + (hi - lo) / 2 * t for lo, hi in zip(low, high)]
    # E exp<z, y> factorises over coordinates; each factor is a 1-D Gauss-Legendre mean
    expected = sum(special.logsumexp(z[:, [i]] * g, b=wt / 2, axis=-1) for i, g in enumerate(grids))
    got = lse(mf.UniformBox(low, high), z)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-12, atol=1e-15)


def test_uniform_ball_d3_closed_form():
    center = np.array([0.5, -1.0, 2.0])
    r = 1.5
    rng = np.random.default_rng(0)
    z = rng.normal(size=(6, 3)) * np.array([[0.1], [0.5], [1.0], [3.0], [10.0], [30.0]])
    a = r * np.linalg.norm(z, axis=-1)
    expected = np.log(3 * (a * np.cosh(a) - np.sinh(a)) / a**3) + z @ center
    got = lse(mf.UniformBall(center, r), z)
    assert rel_err(got, expected) <= 1e-12
    # small |z|: log E exp(a u_1) = a^2 E[u_1^2] / 2 + O(a^4), E[u_1^2] = 1 / (d + 2)
    zs = np.array([[1e-4, 0.0, 0.0]])
    got_small = np.asarray(lse(mf.UniformBall(np.zeros(3), 1.0), zs))
    np.testing.assert_allclose(got_small, [1e-8 / 10], rtol=1e-6)


def test_uniform_ball_d2_bessel_and_d1_is_box():
    z = np.array([[0.3, 0.4], [2.0, -1.0], [-8.0, 6.0]])
    a = 0.7 * np.linalg.norm(z, axis=-1)
    # uniform disc: E exp(a u_1) = 2 I_1(a) / a (I_1 = ive * e^a for stability)
    expected = np.log(2 * special.ive(1, a) / a) + a + z @ np.array([1.0, -1.0])
    got = lse(mf.UniformBall(np.array([1.0, -1.0]), 0.7), z)
    assert rel_err(got, expected) <= 1e-12
    z1 = np.array([[-3.0], [0.2], [5.0]])
    ball = lse(mf.UniformBall(np.array([0.25]), 2.0), z1)
    box = lse(mf.UniformBox(np.array([-1.75]), np.array([2.25])), z1)
    assert rel_err(ball, box) <= 1e-12


FAMILIES = {
    "gaussian": lambda: mf.Gaussian(np.array([0.3, -0.8]), np.array([[1.0, 0.4], [0.4, 0.5]])),
    "mixture": lambda: mf.GaussianMixture(
        np.array([0.3, 0.7]), np.array([[1.0, 0.0], [-0.5, 0.5]]),
        np.array([[[0.5, 0.1], [0.1, 0.3]], [[0.2, 0.0], [0.0, 0.8]]])),
    "box": lambda: mf.UniformBox(np.array([-1.0, 0.5]), np.array([2.0, 1.0])),
    "ball": lambda: mf.UniformBall(np.array([0.5, -1.0]), 1.5),
}


@pytest.mark.parametrize("name", list(FAMILIES))
def test_lse_matches_monte_carlo_of_the_sampler(getkey, name):
    fam = FAMILIES[name]()
    n = 40_000
    x, w = fam.tokens(getkey(), n)
    assert x.shape == (n, 2)
    np.testing.assert_allclose(np.asarray(w), 1.0 / n)
    z = np.array([[0.5, -0.3], [-0.4, 0.9], [1.0, 0.6]])
    e = np.exp(z @ np.asarray(x).T)  # (3, n)
    mc, se = e.mean(axis=1), e.std(axis=1) / np.sqrt(n)
    exact = np.exp(np.asarray(lse(fam, z)))
    # 5 standard errors: fails by chance with probability ~ 6e-7 per z
    assert np.all(np.abs(mc - exact) <= 5 * se), (mc, exact, se)


def test_sample_tokens_stacks_families_and_pads_discrete(getkey):
    fams = [FAMILIES["gaussian"](), mf.Discrete(np.array([[0.0, 1.0], [1.0, 0.0]]))]
    batch = mf.sample_tokens(getkey(), fams, 5)
    assert batch.x.shape == (2, 5, 2) and batch.w.shape == (2, 5)
    np.testing.assert_allclose(np.asarray(batch.w).sum(1), 1.0, rtol=1e-14)
    np.testing.assert_array_equal(np.asarray(batch.w)[1], [0.5, 0.5, 0, 0, 0])


def test_token_batch_uniform_weights_and_query():
    x = np.arange(12.0).reshape(2, 3, 2)
    tb = mf.TokenBatch(x)
    np.testing.assert_allclose(np.asarray(tb.w), 1 / 3)
    q = tb.append_query(jnp.array([9.0, -9.0]))
    assert q.x.shape == (2, 4, 2)
    np.testing.assert_array_equal(np.asarray(q.x)[:, -1], [[9.0, -9.0]] * 2)
    np.testing.assert_array_equal(np.asarray(q.w)[:, -1], 0.0)
    np.testing.assert_array_equal(np.asarray(q.x)[:, :3], x)


# ---------------------------------------------------------------------------------------------
# Head measures


def test_factored_heads_merge_to_qtk():
    rng = np.random.default_rng(1)
    Q, K, V = rng.normal(size=(2, 3, 2, 4)), rng.normal(size=(2, 3, 2, 4)), rng.normal(size=(2, 3, 4, 4))
    h = mf.HeadMeasure(Q=Q, K=K, V=V)
    assert h.factored and (h.num_layers, h.num_heads, h.dim) == (2, 3, 4)
    expected = np.stack([[Q[l, m].T @ K[l, m] for m in range(3)] for l in range(2)])
    assert rel_err(h.A, expected) <= 1e-14


def test_linear_heads_at_depth_interpolate_nodes():
    rng = np.random.default_rng(2)
    A, V = rng.normal(size=(4, 2, 3, 3)), rng.normal(size=(4, 2, 3, 3))  # L = 3 cells, 4 nodes
    h = mf.HeadMeasure(A=A, V=V, interpolation="linear")
    assert h.num_layers == 3
    for s, (l, u) in {0.0: (0, 0.0), 0.5: (1, 0.5), 0.75: (2, 0.25), 1.0: (2, 1.0)}.items():
        p = h.at_depth(s)
        assert rel_err(p["A"], (1 - u) * A[l] + u * A[l + 1]) <= 1e-14
        assert rel_err(p["V"], (1 - u) * V[l] + u * V[l + 1]) <= 1e-14
    pw = mf.HeadMeasure(A=A[:3], V=V[:3])
    np.testing.assert_array_equal(np.asarray(pw.at_depth(0.5)["A"]), A[1])
    np.testing.assert_array_equal(np.asarray(pw.at_depth(1.0)["A"]), A[2])


def test_gaussian_heads_scaling_and_symmetric_pairs(getkey):
    # symmetric_heads draws gaussian_heads for half the heads, then mirrors them as (A, V) and
    # (A, -V). Entries are N(0, sigma^2 / d) (for factored heads, those of A = Q^T K): 8192
    # samples give a variance to ~1.6% (1 s.e.).
    d = 8
    s = mf.symmetric_heads(getkey(), 2, 128, d, scale_A=2.0, scale_V=0.5)
    np.testing.assert_allclose(np.var(np.asarray(s.A)), 4.0 / d, rtol=0.08)
    np.testing.assert_allclose(np.var(np.asarray(s.V)), 0.25 / d, rtol=0.08)
    f = mf.symmetric_heads(getkey(), 2, 128, d, scale_A=2.0, rank=4)
    np.testing.assert_allclose(np.var(np.asarray(f.A)), 4.0 / d, rtol=0.15)
    for h in (s, f):
        for k, v in h.params.items():
            v = np.asarray(v)
            np.testing.assert_array_equal(v[:, 64:], -v[:, :64] if k == "V" else v[:, :64])
