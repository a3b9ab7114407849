"""The LSE injectivity certificate: known dependences, generic independence, agreement of tests.

Known dependences are exact identities of the LSE functions:

- a translate: LSE_{μ(· - t)}(z) = LSE_μ(z) + ⟨t, z⟩ (dependent modulo affine, not constants);
- a Dirac δ_a: LSE(z) = ⟨a, z⟩ (a lone dependent column modulo affine; modulo constants iff a = 0);
- Gaussians: LSE(z) = ⟨m, z⟩ + ½ zᵀΣz, so more than d(d+1)/2 of them are dependent modulo affine
  with coefficients c such that Σ c_i Σ_i = 0.

Every case runs all tests; the query-key NTK block, `hessian` and `mod_affine` must agree, and the
value NTK block with `mod_constants`. Discrete cases share one shape (B=3, at most 6 atoms, d=2)
so the NTK through the flow compiles once.
"""

import jax
import numpy as np
import pytest

import meanfield_tf as mf

D = 2
S = 128  # z samples; the NTK uses S distinct heads
rng = np.random.default_rng(7)
A6, B4, C5 = rng.normal(size=(6, D)), rng.normal(size=(4, D)), rng.normal(size=(5, D))
W6 = rng.dirichlet(np.ones(6))
T = np.array([0.7, -0.4])


def spd(scale=1.0):
    m = rng.normal(size=(D, D))
    return scale * (m @ m.T / D + 0.3 * np.eye(D))


COVS = [spd() for _ in range(4)]
MEANS = [rng.normal(size=D) for _ in range(4)]
MIX = [mf.GaussianMixture(np.array([0.3, 0.7]), rng.normal(size=(2, D)),
                          np.stack([spd(0.5), spd(0.5)])) for _ in range(3)]
MIX_T = mf.GaussianMixture(MIX[0].weights, MIX[0].means + T, MIX[0].covs)

# name: (families, independent mod affine, independent mod constants, expected null vector or None)
CASES = {
    "discrete_translate": ([mf.Discrete(A6, W6), mf.Discrete(B4), mf.Discrete(A6 + T, W6)],
                           False, True, np.array([1.0, 0.0, -1.0]) / np.sqrt(2)),
    "dirac": ([mf.Discrete(A6), mf.Discrete(B4[:1]), mf.Discrete(C5)],
              False, True, np.array([0.0, 1.0, 0.0])),
    "dirac_at_origin": ([mf.Discrete(A6), mf.Discrete(C5), mf.Discrete(np.zeros((1, D)))],
                        False, False, np.array([0.0, 0.0, 1.0])),
    "gaussians_4": ([mf.Gaussian(m, c) for m, c in zip(MEANS, COVS)], False, True, None),
    "mixture_translate": ([MIX[0], mf.UniformBall(np.zeros(D), 1.0), MIX_T],
                          False, True, np.array([1.0, 0.0, -1.0]) / np.sqrt(2)),
    "discrete_generic": ([mf.Discrete(A6, W6), mf.Discrete(B4), mf.Discrete(C5)], True, True, None),
    "gaussians_3": ([mf.Gaussian(m, c) for m, c in zip(MEANS[:3], COVS[:3])], True, True, None),
    "mixtures": (MIX, True, True, None),
    "boxes": ([mf.UniformBox([-1.0, -1.0], [1.0, 1.0]), mf.UniformBox([-0.5, 0.2], [1.0, 1.5]),
               mf.UniformBox([0.0, 0.0], [0.5, 3.0])], True, True, None),
    "balls": ([mf.UniformBall(np.zeros(D), 1.0), mf.UniformBall(np.ones(D), 2.0),
               mf.UniformBall(np.array([1.0, -1.0]), 0.5)], True, True, None),
}

_CACHE = {}


def certificate(name):
    if name not in _CACHE:
        _CACHE[name] = mf.injectivity_certificate(CASES[name][0], key=jax.random.PRNGKey(3),
                                                  num_samples=S)
    return _CACHE[name]


def aligned(u, v):
    return abs(float(np.dot(u, v))) / (np.linalg.norm(u) * np.linalg.norm(v))


@pytest.mark.parametrize("name", list(CASES))
def test_verdicts_and_agreement(name):
    _, indep_affine, indep_const, null = CASES[name]
    cert = certificate(name)
    affine = [cert.tests["mod_affine"], cert.tests["hessian"], cert.tests["ntk"]]
    const = [cert.tests["mod_constants"], cert.ntk.blocks["V"], cert.ntk.blocks["full"]]
    assert cert.tests["ntk"] is cert.ntk.blocks["A"]
    for tests, expected in ((affine, indep_affine), (const, indep_const)):
        for t in tests:
            assert t.independent == expected
            if expected:
                # independent: far from rounding (the margin makes the verdict robust)
                assert t.ratio > 1e4 * t.threshold
            else:
                # dependent: at rounding level, well below the threshold
                assert t.ratio <= t.threshold
    assert cert.agree
    assert cert.ntk.source == ("flow" if all(isinstance(f, mf.Discrete) for f in CASES[name][0])
                               else "exact_lse")
    if null is not None:  # every test names the same dependence, on the unscaled functions
        for t in affine:
            assert aligned(t.null_vector, null) > 1 - 1e-10


def test_gaussian_null_vector_cancels_covariances():
    """More Gaussians than d(d+1)/2: the null vector is a dependence Σ c_i Σ_i = 0."""
    cert = certificate("gaussians_4")
    for name in ("mod_affine", "hessian", "ntk"):
        c = cert.tests[name].null_vector
        assert np.all(np.abs(c) > 1e-3)  # all four Gaussians are involved
        combo = sum(ci * cov for ci, cov in zip(c, COVS))
        assert np.abs(combo).max() <= 1e-12 * max(np.abs(cov).max() for cov in COVS)
        assert cert.tests[name].nullity == 1


def test_thresholds_follow_the_documented_rule():
    cert = certificate("dirac")
    eps = np.finfo(np.float64).eps
    assert cert.tests["mod_affine"].threshold == pytest.approx(100 * eps * np.sqrt(S))
    assert cert.tests["mod_constants"].threshold == pytest.approx(100 * eps * np.sqrt(S))
    assert cert.tests["hessian"].threshold == pytest.approx(100 * eps * np.sqrt(S * D * D))
    rows_a = D * S * 2 * D * D  # output coordinates x (S pairs of heads = 2S particles) x d²
    assert cert.tests["ntk"].threshold == pytest.approx(100 * eps * np.sqrt(rows_a))


def test_lse_test_matches_least_squares_reference(getkey):
    """Ratio of mod_affine against a NumPy lstsq projection of the scaled columns."""
    fams = CASES["boxes"][0]
    z = mf._injectivity.sample_z(getkey(), 64, D, 1.0)
    zn = np.asarray(z)
    cols = np.stack([np.asarray(f.lse(z)) for f in fams], axis=1)
    cols = cols / np.linalg.norm(cols, axis=0)
    for affine in (True, False):
        basis = np.concatenate([np.ones((64, 1)), zn], axis=1) if affine else np.ones((64, 1))
        coef, *_ = np.linalg.lstsq(basis, cols, rcond=None)
        s = np.linalg.svd(cols - basis @ coef, compute_uv=False)
        got = mf.lse_test(fams, z, affine=affine)
        assert got.ratio == pytest.approx(s[-1] / s[0], rel=1e-9)


def test_hessian_is_the_tilted_covariance(getkey):
    """lse_derivatives of a discrete measure: tilted mean and covariance (NumPy softmax sums)."""
    fam = mf.Discrete(A6, W6)
    z = mf._injectivity.sample_z(getkey(), 5, D, 1.0)
    g, h = mf._injectivity.lse_derivatives(fam, z)
    for k in range(5):
        s = A6 @ np.asarray(z[k]) + np.log(W6)
        p = np.exp(s - s.max())
        p /= p.sum()
        m = p @ A6
        cov = (p[:, None] * (A6 - m)).T @ (A6 - m)
        np.testing.assert_allclose(np.asarray(g[k]), m, rtol=1e-13, atol=1e-14)
        np.testing.assert_allclose(np.asarray(h[k]), cov, rtol=1e-12, atol=1e-13)


def test_empirical_token_batch_input(getkey):
    """A TokenBatch (with padding) is certified as its empirical sequences."""
    x = np.stack([np.concatenate([A6[:4], np.zeros((2, D))]), A6, A6[:6] + T])
    w = np.stack([np.r_[np.full(4, 0.25), 0, 0], W6, W6])
    cert = mf.injectivity_certificate(mf.TokenBatch(x, w), key=getkey(), num_samples=S)
    assert not cert.tests["mod_affine"].independent and cert.tests["mod_constants"].independent
    assert aligned(cert.tests["mod_affine"].null_vector, np.array([0.0, 1.0, -1.0])) > 1 - 1e-10
    assert cert.agree


def test_bad_inputs(getkey):
    fams = CASES["discrete_generic"][0]
    with pytest.raises(mf.InputError, match="same dimension"):
        mf.injectivity_certificate([mf.Discrete(A6), mf.Discrete(np.ones((2, 3)))], key=getkey())
    with pytest.raises(mf.InputError, match="num_samples"):
        mf.injectivity_certificate(fams, key=getkey(), num_samples=4)
    with pytest.raises(mf.InputError, match="z_scale"):
        mf.injectivity_certificate(fams, key=getkey(), z_scale=0.0)
    with pytest.raises(mf.InputError, match="num_heads"):
        mf.ntk_test(fams, key=getkey(), num_heads=3)
    with pytest.raises(mf.InputError, match="raise num_heads"):
        mf.ntk_test(fams * 3, key=getkey(), num_heads=2)
    with pytest.raises(mf.InputError, match="at least one"):
        mf.injectivity_certificate([], key=getkey())
