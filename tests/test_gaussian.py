"""The exact Gaussian moment flow, and the token simulator converging to it as n grows.

For mu = N(m, S) a head's velocity is affine, a(x) = V (m + S A^T x), so Gaussians stay Gaussian:
dm/ds = mean_h V_h (m + S A_h^T m), dS/ds = M S + S M^T with M = mean_h V_h S A_h^T.
"""

import diffrax
import jax.numpy as jnp
import numpy as np
from conftest import rel_err

import meanfield_tf as mf
from meanfield_tf._depth import CellArgs
from meanfield_tf._gaussian import gaussian_moment_velocity


def test_diagonal_heads_closed_form():
    # Diagonal A, V and a diagonal initial covariance decouple the coordinates. In one layer with
    # beta = mean_h v_h and c = mean_h v_h a_h (per coordinate), over a depth t inside the layer:
    #   sigma(t) = sigma0 / (1 - 2 c sigma0 t),   m(t) = m0 exp(beta t) / sqrt(1 - 2 c sigma0 t).
    rng = np.random.default_rng(0)
    L, M, d = 3, 2, 3
    a = rng.uniform(-1.0, 1.0, size=(L, M, d))
    v = rng.uniform(-1.0, 1.0, size=(L, M, d))
    eye = np.eye(d)
    heads = mf.HeadMeasure(A=jnp.asarray(a[..., None] * eye), V=jnp.asarray(v[..., None] * eye))
    m0, s0 = np.array([1.0, -0.5, 2.0]), np.array([0.8, 0.3, 1.2])
    ms, ss = [m0], [s0]
    for layer in range(L):
        beta, c = v[layer].mean(0), (v[layer] * a[layer]).mean(0)
        den = 1 - 2 * c * ss[-1] / L
        assert den.min() > 0.3  # far from the finite-depth blow-up of the covariance
        ms.append(ms[-1] * np.exp(beta / L) / np.sqrt(den))
        ss.append(ss[-1] / den)
    ms, covs = np.stack(ms), np.stack([np.diag(s) for s in ss])

    accurate = mf.gaussian_flow(heads, m0, np.diag(s0),
                                mf.DepthSolver(diffrax.Dopri8(), mf.FixedSteps(8)))
    assert bool(np.all(np.asarray(accurate.converged)))
    np.testing.assert_allclose(np.asarray(accurate.s), np.arange(L + 1) / L, atol=1e-15)
    assert rel_err(accurate.mean, ms) <= 1e-12
    assert rel_err(accurate.cov, covs) <= 1e-12


def test_moment_velocity_matches_quadrature_of_attention():
    # Treat a tensor Gauss-Hermite rule for N(m, S) (d = 2, 30 x 30 nodes) as a weighted token
    # measure, evaluate the attention velocity at its nodes in NumPy, and integrate:
    #   dm/ds = E[v(Y)],   dS/ds = E[(Y - m) v(Y)^T + v(Y) (Y - m)^T].
    # Exponentially tilted Gaussians are integrated by Gauss-Hermite to near rounding.
    rng = np.random.default_rng(1)
    M, d = 3, 2
    A = 0.6 * rng.normal(size=(M, d, d))
    V = rng.normal(size=(M, d, d))
    m = np.array([0.4, -0.2])
    S = np.array([[0.5, 0.2], [0.2, 0.4]])
    t, wt = np.polynomial.hermite_e.hermegauss(30)
    xi = np.stack(np.meshgrid(t, t, indexing="ij"), -1).reshape(-1, d)
    y = m + xi @ np.linalg.cholesky(S).T
    w = np.outer(wt, wt).reshape(-1) / (2 * np.pi)
    keys = w > 1e-300
    y, w = y[keys], w[keys] / w[keys].sum()
    vel = np.zeros_like(y)
    for Am, Vm in zip(A, V):
        s = y @ Am @ y.T + np.log(w)
        p = np.exp(s - s.max(1, keepdims=True))
        vel += (p / p.sum(1, keepdims=True)) @ y @ Vm.T
    vel /= M
    # the velocity of a Gaussian measure is affine: v(y) = mean_h V_h (m + S A_h^T y)
    affine = np.mean([(m + y @ Am @ S) @ Vm.T for Am, Vm in zip(A, V)], axis=0)
    assert rel_err(vel, affine) <= 1e-10
    dm_ref = w @ vel
    dS_ref = (y - m).T @ (w[:, None] * vel)
    dS_ref = dS_ref + dS_ref.T

    args = CellArgs({"A": jnp.asarray(A), "V": jnp.asarray(V)}, None, jnp.asarray(0.0), 1)
    dm, dS = gaussian_moment_velocity(jnp.asarray(0.0), (jnp.asarray(m), jnp.asarray(S)), args)
    assert rel_err(dm, dm_ref) <= 1e-10
    assert rel_err(dS, dS_ref) <= 1e-10


def test_sampled_tokens_converge_to_the_moment_flow():
    # For each n in (32, 128, 512), 32 independent sequences of n tokens ~ N(m, S) are pushed by
    # `flow`; their empirical moments at s = 1 are compared with the exact moment flow. All 96
    # sequences run in one batch of 512 token slots (sequences interact only through the heads):
    # a sequence of n tokens fills its first n slots, the rest is zero-weight padding.
    rng = np.random.default_rng(3)
    A, V = rng.normal(size=(2, 2, 2, 2)) / np.sqrt(2), rng.normal(size=(2, 2, 2, 2)) / np.sqrt(2)
    heads = mf.HeadMeasure(A=jnp.asarray(A), V=jnp.asarray(V))
    mean, cov = np.array([0.5, -0.3]), np.array([[0.6, 0.2], [0.2, 0.4]])
    exact = mf.gaussian_flow(heads, mean, cov)
    m1, S1 = np.asarray(exact.mean[-1]), np.asarray(exact.cov[-1])
    assert np.abs(S1 - cov).max() + np.abs(m1 - mean).max() > 0.1  # the moments really move
    ns, seeds, slots = np.array([32, 128, 512]), 32, 512
    x = rng.multivariate_normal(mean, cov, size=(len(ns) * seeds, slots))
    n_of_row = np.repeat(ns, seeds)
    w = (np.arange(slots) < n_of_row[:, None]) / n_of_row[:, None]
    # Bosh3 with 2 steps per layer (3 stages, half the work of Tsit5): on the moment ODE its
    # discretisation error is ~1e-4, far below the sampling error (> 0.05) at every n here
    sol = mf.flow(heads, mf.TokenBatch(jnp.asarray(x), jnp.asarray(w)), mf.DepthSolver(
                  diffrax.Bosh3(), mf.FixedSteps(2), mf.ChunkedKernel(128)))
    x1 = np.asarray(sol.x)
    rms = []
    for i, n in enumerate(ns):
        xi = x1[i * seeds:(i + 1) * seeds, :n]
        m_hat = xi.mean(axis=1)
        c = xi - m_hat[:, None]
        S_hat = np.einsum("bni,bnj->bij", c, c) / n
        err = np.linalg.norm(m_hat - m1, axis=-1) + np.linalg.norm(S_hat - S1, axis=(-2, -1))
        rms.append(np.sqrt(np.mean(err**2)))
    rms = np.array(rms)
    slope = np.polyfit(np.log(ns), np.log(rms), 1)[0]
    print("rms errors", rms, "slope", slope)
    assert np.all(np.diff(rms) < 0)
    # Monte Carlo rate n^{-1/2}. The errors are heavy-tailed (the flow amplifies covariance
    # errors): with 32 sequences per n the fitted slope over a factor 16 in n scatters by about
    # +-0.08 between random draws (measured over draws: -0.43 to -0.49), and O(1/n) bias at the
    # smallest n flattens it slightly; the band is -0.5 +- 0.2.
    assert -0.7 <= slope <= -0.3
