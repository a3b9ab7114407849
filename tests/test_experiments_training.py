"""The `injectivity`, `convergence` and `width-depth` experiments at tiny sizes: the properties
they show, the results.json contracts, and independent checks of what they rely on."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import meanfield_tf as mf
from meanfield_tf.experiments import convergence, injectivity, width_depth
from meanfield_tf.experiments._teacher import (
    Trainer,
    generic_sequences,
    ntk_spectrum,
    readout,
)


def _logsumexp(a, axis):
    m = a.max(axis=axis, keepdims=True)
    return (m + np.log(np.exp(a - m).sum(axis=axis, keepdims=True))).squeeze(axis)


def _discrete_lse(f, z):
    """LSE of a discrete measure by a NumPy loop over atoms (independent of the library)."""
    atoms, w = np.asarray(f.atoms), np.asarray(f.weights)
    return _logsumexp(np.stack([z @ a + np.log(wk) for a, wk in zip(atoms, w)], 1), 1)


def test_injectivity_controls_carry_their_dependences():
    """The convolution control satisfies LSE_mu + LSE_nu = LSE_{mu*nu} exactly, and four
    Gaussians' quadratic parts (vech of the covariances) span at most d(d+1)/2 = 3 dimensions:
    the dependences the experiment claims, checked without the certificate."""
    cases = {c[0]: c[1] for c in injectivity._cases(0)}
    z = np.random.default_rng(1).standard_normal((50, 2))
    mu, nu, conv = cases["convolution"]
    np.testing.assert_allclose(_discrete_lse(mu, z) + _discrete_lse(nu, z),
                               _discrete_lse(conv, z), rtol=1e-12, atol=1e-12)
    vech = np.stack([np.asarray(g.cov)[np.triu_indices(2)] for g in cases["gaussians-4"]])
    assert np.linalg.matrix_rank(vech) == 3
    six = np.stack([np.concatenate([np.asarray(g.cov)[np.triu_indices(2)], np.asarray(g.mean)])
                    for g in cases["gaussians-6"]])
    assert np.linalg.matrix_rank(six) == 5  # 6 quadratics without constant term in 5 dims


def test_injectivity_verdicts(tmp_path):
    cfg = injectivity.Config(seeds=1, num_samples=64, sweep_points=2)
    res = injectivity.run(cfg, tmp_path, lambda s: None)
    keys = {"name", "N", "mod_affine_ratio", "mod_constants_ratio", "hessian_ratio",
            "ntk_A_ratio", "ntk_V_ratio", "ntk_ratio", "tests_agree"}
    for case in res["cases"]:
        assert keys <= set(case), case["name"]
        assert case["tests_agree"], case["name"]
        assert case["verdicts_right"], case["name"]
        thr = case["thresholds"]
        if case["control"]:  # dependent modulo affine: all three affine tests at rounding level
            for k in ("mod_affine", "hessian", "ntk_A"):
                assert case[f"{k}_ratio"] <= thr[k], (case["name"], k)
        else:  # independent: every test well above its threshold
            for k in injectivity._TESTS:
                assert case[f"{k}_ratio"] > 1e3 * thr[k], (case["name"], k)
    by = {c["name"]: c for c in res["cases"]}
    for name in ("convolution", "gaussians-6"):
        for k in ("mod_constants", "ntk_V", "ntk"):
            assert by[name][f"{k}_ratio"] <= by[name]["thresholds"][k]
    assert {r["name"] for r in res["z_scale_sweep"]} == {"ball", "convolution"}
    assert sorted(p.name for p in (tmp_path / "figures").iterdir()) == [
        "injectivity_ratios.png", "injectivity_z_scale.png"]
    assert injectivity.rows(res) and "verdicts are right in" in injectivity.discussion(res)


def test_ntk_units_match_one_training_step():
    """dY/dt = -K grad_Y R with grad_Y R = r / N: one tiny Euler step moves the readouts by
    -tau K r / N to first order (the factor behind the predicted slope -2 lambda_min / N)."""
    jax.config.update("jax_enable_x64", True)
    kw = convergence._solve_kwargs(convergence.Config())
    e = jnp.full((2,), 1 / math.sqrt(2))
    tokens_q = generic_sequences(jax.random.PRNGKey(0), 3, 4, 2, 1.0).append_query(e)
    heads = mf.symmetric_heads(jax.random.PRNGKey(1), 2, 6, 2, dtype=jnp.float64)
    y = e[None] + 0.3 * jax.random.normal(jax.random.PRNGKey(2), (3, 2), jnp.float64)
    batch = mf.Batch(tokens_q, mf.QueryRegression(y))
    K = np.asarray(ntk_spectrum(heads, tokens_q, kw).gram)
    r = np.asarray(readout(heads, tokens_q, kw) - y).reshape(-1)
    tau = 1e-6
    traj = Trainer(kw).train(heads, batch, tau=tau, steps=1)
    dy = np.asarray(readout(traj.heads, tokens_q, kw) - readout(heads, tokens_q, kw)).reshape(-1)
    predicted = -tau * K @ r / 3
    np.testing.assert_allclose(dy, predicted, rtol=1e-4, atol=1e-6 * np.abs(predicted).max())


def test_convergence_slope_and_control(tmp_path):
    cfg = convergence.Config(seeds=1, num_layers=2, num_heads=8, epsilons=(0.01, 1.0),
                             snapshots=2, horizon=8.0)
    res = convergence.run(cfg, tmp_path, lambda s: None)
    run_keys = {"epsilon", "lambda_min", "lambda_max", "predicted_slope", "late_slope",
                "initial_loss", "final_loss", "w2c", "w2c_bound"}
    assert all(run_keys <= set(r) for r in res["runs"])
    assert {"family", "final_loss", "initial_loss", "kernel_residual"} <= set(res["control"])
    assert res["certificate"]["passes"]
    small = res["runs"][0]
    assert small["epsilon"] == 0.01
    assert abs(small["slope_ratio"] - 1) < 0.25
    assert abs(small["late_slope"] / small["linearised_late_slope"] - 1) < 0.02
    assert small["final_loss"] < 1e-4 * small["initial_loss"]
    assert small["w2c"] <= small["w2c_bound"]
    ctrl = res["control"]
    assert not ctrl["certificate_passes"] and ctrl["kernel_dim"] == 2
    # the control plateaus: its loss stays a clear fraction of the initial loss, orders of
    # magnitude above the injective run's, and its part in ker K does not decay
    assert ctrl["final_loss"] > 0.02 * ctrl["initial_loss"]
    assert ctrl["final_loss"] > 1e3 * small["final_loss"]
    assert ctrl["kernel_residual"] > 0.5 * ctrl["kernel_residual_initial"]
    assert len(list((tmp_path / "figures").iterdir())) == 3
    assert len(convergence.rows(res)) == 3


def test_width_depth_gap_shrinks(tmp_path):
    cfg = width_depth.Config(seeds=3, layers=(1, 2, 4), heads=(4, 16, 64), horizon=1.5)
    res = width_depth.run(cfg, tmp_path, lambda s: None)
    gaps = [g["gap"] for g in res["gaps"]]
    assert gaps[0] > gaps[1] > gaps[2], gaps
    assert {"runs", "gaps", "slope", "curves"} <= set(res)
    assert max(r["step_ratio"] for r in res["runs"]) == pytest.approx(cfg.step_fraction)
    assert res["slope"] < 0
    assert len(list((tmp_path / "figures").iterdir())) == 2


def test_bad_configs_are_one_line_errors(tmp_path):
    with pytest.raises(mf.ConfigError, match="even"):
        convergence.run(convergence.Config(num_heads=7), tmp_path, print)
    with pytest.raises(mf.ConfigError, match="same length"):
        width_depth.run(width_depth.Config(layers=(2, 8)), tmp_path, print)
    with pytest.raises(mf.ConfigError, match="sweep"):
        injectivity.run(injectivity.Config(sweep_min=2.0, sweep_max=1.0), tmp_path, print)
