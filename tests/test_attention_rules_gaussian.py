"""Exact Gaussian references of L2 and Sinkhorn attention, end-to-end calls and the command line.

The affine Gaussian laws are checked against the kernels themselves on a fine quadrature grid of
the Gaussian (an independent discretisation of the integrals), Sinkhorn's infinite-iteration
closed form against many iterations, one iteration against softmax, and the simulator on sampled
tokens against the moment flows as n grows.
"""

import diffrax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import norm, qmc

import meanfield_tf as mf
from meanfield_tf._errors import InputError
from meanfield_tf.cli import main

MEAN = np.array([0.3, -0.2])
COV = np.array([[0.8, 0.3], [0.3, 0.5]])


def psd_heads(seed, M=2, d=2, scale=0.3):
    """Heads with A = s QᵀQ + a small antisymmetric part (positive semi-definite Ã)."""
    rng = np.random.default_rng(seed)
    Q = rng.normal(size=(M, d, d)) / np.sqrt(d)
    skew = rng.normal(size=(M, d, d)) * 0.1
    A = scale * np.einsum("mki,mkj->mij", Q, Q) + skew - np.swapaxes(skew, 1, 2)
    V = np.eye(d) * 0.5 + rng.normal(size=(M, d, d)) * 0.3
    return A, V


def grid_measure(mean, cov, half_width=8.0, points=41):
    """Tokens on a grid of the whitened coordinates with weights ∝ the Gaussian density: the
    trapezoid rule, spectrally accurate for these smooth, fast-decaying integrands."""
    t = np.linspace(-half_width, half_width, points)
    z = np.stack(np.meshgrid(t, t, indexing="ij"), -1).reshape(-1, 2)
    x = mean + z @ np.linalg.cholesky(cov).T
    w = np.exp(-0.5 * (z**2).sum(1))
    return x, w / w.sum(), z


@pytest.mark.parametrize("kernel", [mf.L2Kernel(), mf.SinkhornKernel(3)], ids=repr)
def test_gaussian_law_matches_the_kernel_on_a_quadrature_grid(kernel):
    A, V = psd_heads(0)
    x, w, z = grid_measure(MEAN, COV)
    v = np.asarray(kernel(jnp.asarray(x), jnp.asarray(w), jnp.asarray(A), jnp.asarray(V)))
    B, c = kernel.gaussian_velocity(jnp.asarray(A), jnp.asarray(V), jnp.asarray(MEAN),
                                    jnp.asarray(COV))
    inner = (np.abs(z) <= 2.5).all(1)  # queries whose tilted measure the grid resolves
    affine = x[inner] @ np.asarray(B).T + np.asarray(c)
    assert np.abs(v[inner] - affine).max() <= 1e-10 * np.abs(affine).max()
    if isinstance(kernel, mf.SinkhornKernel):  # and the affine law is not softmax's
        Bs, _ = mf.DenseKernel().gaussian_velocity(jnp.asarray(A), jnp.asarray(V),
                                                   jnp.asarray(MEAN), jnp.asarray(COV))
        assert np.abs(np.asarray(Bs) - np.asarray(B)).max() > 1e-3


def test_sinkhorn_gaussian_limit_closed_form_and_one_iteration():
    A, V = (jnp.asarray(a) for a in psd_heads(1, scale=0.8))
    m, S = jnp.asarray(MEAN), jnp.asarray(COV)
    B_inf, c_inf = mf.sinkhorn_gaussian_limit(A, V, m, S)
    B_k, c_k = mf.sinkhorn_gaussian_velocity(A, V, m, S, 200)
    assert np.abs(np.asarray(B_k - B_inf)).max() <= 1e-12 and np.abs(np.asarray(c_k - c_inf)).max() <= 1e-12
    gaps = [float(np.abs(np.asarray(mf.sinkhorn_gaussian_velocity(A, V, m, S, k)[0] - B_inf)).max())
            for k in (1, 2, 3, 4)]
    assert gaps[0] > 1e-2 and all(b < a / 5 for a, b in zip(gaps, gaps[1:])), gaps
    B_1, c_1 = mf.sinkhorn_gaussian_velocity(A, V, m, S, 1)
    B_s, c_s = mf.DenseKernel().gaussian_velocity(A, V, m, S)
    assert np.abs(np.asarray(B_1 - B_s)).max() <= 1e-14 and np.abs(np.asarray(c_1 - c_s)).max() <= 1e-14


def _heads(seed, L=2, M=2, scale=0.3):
    A, V = zip(*(psd_heads(seed + l, M=M, scale=scale) for l in range(L)))
    return mf.HeadMeasure(A=jnp.asarray(np.stack(A)), V=jnp.asarray(np.stack(V)))


def test_sinkhorn_one_iteration_gaussian_flow_is_the_softmax_flow():
    heads = _heads(2)
    ref = mf.gaussian_flow(heads, MEAN, COV)
    for kernel in (mf.SinkhornKernel(1), mf.ChunkedSinkhornKernel(1)):
        got = mf.gaussian_flow(heads, MEAN, COV, mf.DepthSolver(diffrax.Tsit5(), mf.FixedSteps(8),
                                                                 kernel))
        assert np.abs(np.asarray(got.cov - ref.cov)).max() <= 1e-12
        assert np.abs(np.asarray(got.mean - ref.mean)).max() <= 1e-12
    l2 = mf.gaussian_flow(heads, MEAN, COV, mf.DepthSolver(diffrax.Tsit5(), mf.FixedSteps(8),
                                                            mf.L2Kernel()))
    assert np.abs(np.asarray(l2.cov[-1] - ref.cov[-1])).max() > 1e-3  # another rule


def qmc_sample(seed, n, mean, cov):
    """n tokens of N(mean, cov) from a scrambled Sobol sequence (quasi-Monte Carlo: the
    discrepancy falls almost like 1/n), whitened so that the empirical mean and covariance are
    exactly (mean, cov)."""
    z = norm.ppf(qmc.Sobol(2, scramble=True, seed=seed).random(n))
    z -= z.mean(0)
    z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z.T, bias=True))).T
    return mean + z @ np.linalg.cholesky(cov).T


@pytest.mark.slow
@pytest.mark.parametrize("kernel", [mf.ChunkedL2Kernel(512), mf.ChunkedSinkhornKernel(3, 512)],
                         ids=repr)
def test_simulator_approaches_the_gaussian_moment_flow(kernel):
    """The moments of the simulated tokens at s = 1 against the exact moment flow (same solver):
    the error falls clearly from n = 256 to n = 4096 (measured: L2 5.7e-3 -> 2.6e-4, Sinkhorn
    5.5e-4 -> 6.4e-5, with the covariance moving by about 0.1)."""
    heads = _heads(3, L=1, scale=0.3)
    solver = mf.DepthSolver(diffrax.Tsit5(), mf.FixedSteps(1), kernel)
    g = mf.gaussian_flow(heads, MEAN, COV, solver)
    errors = []
    for n in (256, 4096):
        x = qmc_sample(4, n, MEAN, COV)
        tokens = mf.TokenBatch(jnp.asarray(x[None]), jnp.full((1, n), 1.0 / n))
        x1 = np.asarray(mf.flow(heads, tokens, solver).x[0])
        m1 = x1.mean(0)
        c1 = np.cov(x1.T, bias=True)
        errors.append(max(np.abs(m1 - g.mean[-1]).max(), np.abs(c1 - g.cov[-1]).max()))
    moved = np.abs(np.asarray(g.cov[-1]) - COV).max()
    assert errors[1] < errors[0] / 4 and errors[1] < 0.01 * moved, (errors, moved)


def test_rules_without_a_gaussian_limit_refuse():
    heads = _heads(5)
    for kernel in (mf.DenseKernel(causal=True), mf.ChunkedL2Kernel(causal=True)):
        with pytest.raises(InputError, match="causal"):
            mf.gaussian_flow(heads, MEAN, COV, mf.DepthSolver(kernel=kernel))
    bad = mf.HeadMeasure(A=-3 * jnp.eye(2)[None, None], V=jnp.eye(2)[None, None])
    with pytest.raises(InputError, match="not positive definite"):
        mf.gaussian_flow(bad, MEAN, COV, mf.DepthSolver(kernel=mf.L2Kernel()))


PAIRS = [(mf.L2Kernel(), mf.ChunkedL2Kernel(3)),
         (mf.L2Kernel(causal=True), mf.ChunkedL2Kernel(3, causal=True)),
         (mf.DenseKernel(causal=True), mf.ChunkedKernel(3, causal=True)),
         (mf.SinkhornKernel(3), mf.ChunkedSinkhornKernel(3, 3))]


@pytest.mark.parametrize("dense,chunked", PAIRS, ids=[repr(p[0]) for p in PAIRS])
def test_end_to_end_gradient_dense_and_chunked_agree(dense, chunked):
    rng = np.random.default_rng(6)
    B, n, d = 2, 7, 2
    w = rng.uniform(0.5, 1.5, size=(B, n))
    w[:, 4] = 0.0
    tokens = mf.TokenBatch(jnp.asarray(rng.normal(size=(B, n, d))), jnp.asarray(w / w.sum(1, keepdims=True)))
    risk = mf.TokenRegression(jnp.asarray(rng.normal(size=(B, n, d))))
    heads = _heads(7, L=1)
    out = [mf.risk_and_gradient(heads, tokens, risk, solver=mf.DepthSolver(kernel=k))
           for k in (dense, chunked)]
    (l0, g0), (l1, g1) = out
    assert abs(float(l0 - l1)) <= 1e-13 * abs(float(l0))
    for key in ("A", "V"):
        a, b = np.asarray(g0.params[key]), np.asarray(g1.params[key])
        assert np.all(np.isfinite(a)) and np.abs(a - b).max() <= 1e-12 * np.abs(a).max()
    with pytest.raises(InputError, match="explicit"):
        mf.risk_and_gradient(heads, tokens, risk, method=mf.Explicit(),
                             solver=mf.DepthSolver(kernel=dense))


def test_cli_simulate_by_name(tmp_path, capsys):
    cfg = "configs/simulate_attention_rules.yaml"
    small = ["tokens.n=48", "heads.layers=2", "heads.heads=4", "--solver", "euler", "--steps", "2"]
    outs = {}
    for name, flags in [("softmax", ["--kernel", "dense"]),
                        ("sinkhorn1", ["--kernel", "sinkhorn-chunked", "--sinkhorn-iterations",
                                       "1", "--chunk-size", "20"]),
                        ("l2", ["--gaussian-exact"])]:  # the config's kernel: l2-chunked
        out = tmp_path / f"{name}.npz"
        assert main(["simulate", "--config", cfg, *flags, "--out", str(out), *small]) == 0
        outs[name] = np.load(out)["x"]
    assert "cov err" in capsys.readouterr().out
    assert np.abs(outs["sinkhorn1"] - outs["softmax"]).max() <= 1e-12 * np.abs(outs["softmax"]).max()
    assert np.abs(outs["l2"] - outs["softmax"]).max() > 1e-3
    code = main(["simulate", "--config", cfg, "--kernel", "sinkhorn", "--causal", "--out",
                 str(tmp_path / "x.npz"), *small])
    assert code == 2 and "causal" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_train_by_name(tmp_path, capsys):
    tiny = ["dtype=float64", "heads.layers=2", "heads.heads=4", "task.tokens.n=6",
            "train.steps=2", "train.eval_every=1", "train.checkpoint_every=2"]
    assert main(["train", "--quiet", "--out", str(tmp_path / "run"), *tiny,
                 "solver.kernel=l2-chunked", "solver.chunk_size=4", "solver.causal=true"]) == 0
    code = main(["train", "--quiet", "--out", str(tmp_path / "bad"), *tiny, "solver.kernel=l2",
                 "train.gradient=explicit"])
    assert code == 2 and "train.gradient=autodiff" in capsys.readouterr().err
