"""Gradients of the risk: closed forms vs autodiff, all methods vs finite differences.

References are independent of the code under test: float64 central finite differences (with one
Richardson extrapolation, truncation error O(h^4)) of the forward flow, and `jax.vjp` of the dense
attention kernel for the closed forms.
"""

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import meanfield_tf as mf
from conftest import rel_err
from meanfield_tf._heads import merged_query_key


def _weights(key, B, n, zero_last=False):
    w = jax.random.uniform(key, (B, n), minval=0.2, maxval=1.0)
    if zero_last:
        w = w.at[:, -1].set(0.0)
    return w / w.sum(axis=1, keepdims=True)


def _problem(getkey, *, B=2, n=4, d=2, L=3, M=2, rank=None, interpolation="piecewise"):
    heads = mf.gaussian_heads(getkey(), L, M, d, scale_A=1.5, scale_V=1.5, rank=rank,
                              interpolation=interpolation)
    tokens = mf.TokenBatch(jax.random.normal(getkey(), (B, n, d)), _weights(getkey(), B, n))
    risk = mf.TokenRegression(jax.random.normal(getkey(), (B, n, d)))
    return heads, tokens, risk


def _fd_gradient(heads, tokens, risk, solver, stepping, directions=None, h=1e-3):
    """Mean-field gradient L M dR/dθ by Richardson-extrapolated central differences of `flow`.

    `directions=None`: every coordinate; otherwise directional derivatives along given pytrees.
    """
    flat, unravel = ravel_pytree(heads.params)

    def loss(v):
        hh = eqx.tree_at(lambda t: t.params, heads, unravel(v))
        return risk(mf.flow(hh, tokens, mf.DepthSolver(solver, stepping)).x, tokens.w)

    dirs = (jnp.eye(flat.size, dtype=flat.dtype) if directions is None
            else jnp.stack([ravel_pytree(d)[0] for d in directions]))
    loss_v = jax.jit(jax.vmap(loss))

    def central(step):
        return (loss_v(flat + step * dirs) - loss_v(flat - step * dirs)) / (2 * step)

    deriv = (4 * central(h / 2) - central(h)) / 3
    scale = heads.num_layers * heads.num_heads
    if directions is None:
        return unravel(scale * deriv)
    return scale * deriv


def _directional(grads, directions):
    g = ravel_pytree(grads.params)[0]
    return jnp.stack([g @ ravel_pytree(d)[0] for d in directions])


# ---------------------------------------------------------------------------------------------
# Closed forms


@pytest.mark.parametrize("factored", [False, True])
def test_closed_forms_match_vjp_of_kernel(getkey, factored):
    B, n, d, M = 2, 5, 3, 4
    x = jax.random.normal(getkey(), (B, n, d))
    w = _weights(getkey(), B, n, zero_last=True)  # a zero-weight (query) token included
    lam = jax.random.normal(getkey(), (B, n, d))
    params = {"V": jax.random.normal(getkey(), (M, d, d))}
    if factored:
        params["Q"] = jax.random.normal(getkey(), (M, 2, d))
        params["K"] = jax.random.normal(getkey(), (M, 2, d))
    else:
        params["A"] = jax.random.normal(getkey(), (M, d, d))

    def velocity(x, p):
        return mf.attention_velocity(mf.DenseKernel(), x, w, merged_query_key(p), p["V"])

    _, vjp = jax.vjp(velocity, x, params)
    ref_x, ref_p = vjp(lam)
    got_x = mf.adjoint_velocity(x, w, lam, params)
    assert rel_err(got_x, ref_x) < 1e-13
    # the gradient field is per head, without the 1/M head average, and batch-averaged (1/B)
    got_p = mf.gradient_field(x, w, lam, params)
    for k in params:
        assert rel_err(got_p[k], ref_p[k] * M / B) < 1e-13
    # dropping the non-local term changes the adjoint velocity at order one
    local = mf.adjoint_velocity(x, w, lam, params, nonlocal_term=False)
    assert rel_err(local, ref_x) > 0.05


# ---------------------------------------------------------------------------------------------
# The finite transformer: exact gradients


@pytest.mark.parametrize(
    "rank, interpolation, steps",
    [(None, "piecewise", 1), (2, "linear", 2)],
)
def test_finite_transformer_matches_finite_differences(getkey, rank, interpolation, steps):
    heads, tokens, risk = _problem(getkey, rank=rank, interpolation=interpolation)
    solver, stepping = diffrax.Euler(), mf.FixedSteps(steps)
    ref = _fd_gradient(heads, tokens, risk, solver, stepping)
    loss_ref = risk(mf.flow(heads, tokens, mf.DepthSolver(solver, stepping)).x, tokens.w)
    for method in (mf.Autodiff(), mf.Explicit()):
        loss, grads = mf.risk_and_gradient(heads, tokens, risk, method=method,
                                           solver=mf.DepthSolver(solver, stepping))
        assert abs(float(loss - loss_ref)) <= 1e-14 * abs(float(loss_ref))
        assert set(grads.params) == set(heads.params)
        assert grads.interpolation == heads.interpolation
        for k in heads.params:
            assert grads.params[k].shape == heads.params[k].shape
            assert rel_err(grads.params[k], ref[k]) <= 1e-8, (type(method).__name__, k)


def test_explicit_is_the_discrete_adjoint(getkey):
    """Explicit and autodiff agree to rounding on the finite transformer, and the states and
    adjoints it returns reproduce each layer's gradient through `gradient_field`."""
    heads, tokens, risk = _problem(getkey)
    _, g_auto = mf.risk_and_gradient(heads, tokens, risk)
    sol = mf.explicit_adjoint(heads, tokens, risk)
    assert sol.discrete and bool(sol.converged)
    for k in heads.params:
        assert rel_err(sol.grads.params[k], g_auto.params[k]) < 1e-12
    # layer l pairs the state before the layer with the adjoint after it
    for l in range(heads.num_layers):
        theta = {k: v[l] for k, v in heads.params.items()}
        field = mf.gradient_field(sol.states[l], tokens.w, sol.adjoints[l + 1], theta)
        for k in theta:
            assert rel_err(field[k], g_auto.params[k][l]) < 1e-12
    # the terminal adjoint is dR/dX_1 times B
    assert rel_err(sol.adjoints[-1], risk.terminal_adjoint(sol.states[-1], tokens.w)) == 0


def test_dropping_nonlocal_term_gives_wrong_gradient(getkey):
    heads, tokens, risk = _problem(getkey)
    _, exact = mf.risk_and_gradient(heads, tokens, risk)
    _, local = mf.risk_and_gradient(heads, tokens, risk, method=mf.Explicit(nonlocal_term=False))
    errs = [rel_err(local.params[k], exact.params[k]) for k in exact.params]
    assert max(errs) > 0.05, errs  # measured ≈ 0.2–0.6; exact agreement is 1e-12 (test above)


def _query_problem(getkey):
    B, n, d = 3, 4, 2
    heads = mf.gaussian_heads(getkey(), 3, 2, d, scale_A=1.5, scale_V=1.5)
    tokens = mf.TokenBatch(jax.random.normal(getkey(), (B, n, d)), _weights(getkey(), B, n))
    return heads, tokens.append_query(jnp.array([0.3, -0.2]))


def _assert_methods_agree(heads, tokens, risk, tol):
    _, g_auto = mf.risk_and_gradient(heads, tokens, risk)
    _, g_expl = mf.risk_and_gradient(heads, tokens, risk, method=mf.Explicit())
    for k in heads.params:
        assert rel_err(g_expl.params[k], g_auto.params[k]) < tol, type(risk).__name__
        assert float(jnp.abs(g_auto.params[k]).max()) > 0


def test_query_risks_autodiff_equals_explicit(getkey):
    heads, tokens = _query_problem(getkey)
    B, _, d = tokens.x.shape
    P = jax.random.normal(getkey(), (3, d))
    _assert_methods_agree(heads, tokens, mf.QueryRegression(jax.random.normal(getkey(), (B, d))),
                          1e-12)
    _assert_methods_agree(heads, tokens, mf.QueryClassification(jnp.array([0, 2, 1]), P), 1e-12)


@pytest.mark.slow
def test_sinkhorn_risk_autodiff_equals_explicit(getkey):
    heads, tokens = _query_problem(getkey)
    B, _, d = tokens.x.shape
    risk = mf.SinkhornRisk(jax.random.normal(getkey(), (B, 3, d)), epsilon=0.5)
    # autodiff differentiates ott's solve inside the flow's graph, explicit starts from
    # risk.terminal_adjoint: both are ott's implicit gradient, up to the Sinkhorn threshold
    _assert_methods_agree(heads, tokens, risk, 1e-6)


# ---------------------------------------------------------------------------------------------
# The continuous-depth model


@pytest.mark.slow
def test_continuous_methods_converge_to_one_gradient(getkey):
    heads, tokens, risk = _problem(getkey, L=2, M=2, n=4, interpolation="linear")
    solver = diffrax.Tsit5()
    methods = (mf.Autodiff(), mf.Backsolve(), mf.Explicit())
    spread = {}
    grads = {}
    for tol in (1e-5, 1e-10):
        stepping = mf.AdaptiveSteps(rtol=tol, atol=tol)
        gs = [mf.risk_and_gradient(heads, tokens, risk, method=m,
                                   solver=mf.DepthSolver(solver, stepping))[1] for m in methods]
        grads[tol] = gs
        spread[tol] = max(rel_err(ravel_pytree(a.params)[0], ravel_pytree(gs[0].params)[0])
                          for a in gs[1:])
    assert spread[1e-10] <= 1e-6
    assert spread[1e-10] < spread[1e-5]
    # finite differences of a fine fixed-step reference (RK4, 64 steps per layer: error ~1e-9)
    directions = [jax.tree.map(lambda a: jax.random.normal(k, a.shape), heads.params)
                  for k in jax.random.split(getkey(), 4)]
    ref = _fd_gradient(heads, tokens, risk, mf.ClassicalRK4(), mf.FixedSteps(64),
                       directions=directions)
    for g in grads[1e-10]:
        assert rel_err(_directional(g, directions), ref) <= 1e-6


def test_backsolve_refused_with_constant_step_euler(getkey):
    heads, tokens, risk = _problem(getkey)
    with pytest.raises(mf.InputError, match="Backsolve with constant-step Euler"):
        mf.risk_and_gradient(heads, tokens, risk, method=mf.Backsolve())
    with pytest.raises(mf.InputError, match="Backsolve"):
        mf.risk_and_gradient(heads, tokens, risk, method=mf.Backsolve(),
                             solver=mf.DepthSolver(stepping=mf.FixedSteps(8)))


def test_failed_adaptive_solve_gives_nan_and_tolerances_do_not_recompile(getkey):
    heads, tokens, risk = _problem(getkey)

    @eqx.filter_jit
    @eqx.debug.assert_max_traces(max_traces=1)
    def grad(stepping):
        return mf.risk_and_gradient(heads, tokens, risk,
                                    solver=mf.DepthSolver(diffrax.Tsit5(), stepping))

    loss, grads = grad(mf.AdaptiveSteps(rtol=1e-12, atol=1e-12, max_steps_per_layer=2))
    assert np.isnan(float(loss)) and bool(jnp.isnan(grads.V).all())
    loss, grads = grad(mf.AdaptiveSteps(rtol=0.5, atol=0.5, max_steps_per_layer=2))
    assert np.isfinite(float(loss)) and bool(jnp.isfinite(grads.V).all())


# ---------------------------------------------------------------------------------------------
# Mean-field consistency


def test_gradient_field_converges_as_L_and_M_grow(getkey):
    r"""Heads i.i.d. from a fixed law: A = Ā for all heads, V = V̄ + σ ξ, ξ standard normal.

    The mean-field limit of this law is the continuous-depth flow of the single head (Ā, V̄)
    (the velocity is linear in V), solved here to 1e-11 with Tsit5. The gradient field at a fixed
    probe (s = 1/2, θ) of the finite network must converge to the limit's as L and M grow:
    Euler error O(1/L) plus head sampling noise O(1/sqrt(LM)).
    """
    B, n, d = 2, 4, 2
    A_bar = 0.8 * jax.random.normal(getkey(), (d, d))
    V_bar = 0.8 * jax.random.normal(getkey(), (d, d))
    tokens = mf.TokenBatch(jax.random.normal(getkey(), (B, n, d)), _weights(getkey(), B, n))
    risk = mf.TokenRegression(jax.random.normal(getkey(), (B, n, d)))
    probe = {k: jax.random.normal(getkey(), (3, d, d)) for k in ("A", "V")}

    def constant_heads(L, M, key, sigma):
        V = V_bar + sigma * jax.random.normal(key, (L, M, d, d))
        return mf.HeadMeasure(A=jnp.broadcast_to(A_bar, (L, M, d, d)), V=V)

    limit = mf.explicit_adjoint(constant_heads(2, 1, getkey(), 0.0), tokens, risk,
                                solver=mf.DepthSolver(diffrax.Tsit5(),
                                                      mf.AdaptiveSteps(rtol=1e-11, atol=1e-11)))
    ref = mf.gradient_field(limit.states[1], tokens.w, limit.adjoints[1], probe)
    errs, noise = [], []
    for L, M in ((2, 2), (8, 32), (32, 512)):
        fields = []
        for sigma in (1.0, 0.0):  # the law, and its mean (no sampling noise)
            sol = mf.explicit_adjoint(constant_heads(L, M, getkey(), sigma), tokens, risk)
            fields.append(mf.gradient_field(sol.states[L // 2], tokens.w,
                                            sol.adjoints[L // 2 + 1], probe))
        errs.append(max(rel_err(fields[0][k], ref[k]) for k in ref))
        noise.append(max(rel_err(fields[0][k], fields[1][k]) for k in ref))
    print("gradient field vs mean-field limit:", errs, "sampling noise:", noise)
    # measured: errs ≈ 0.60, 0.21, 0.045 (the O(1/L) depth discretisation dominates);
    # the sampling noise ≈ 0.41, 0.070, 0.0075 falls like 1/sqrt(LM) = 1/2, 1/16, 1/128
    assert errs[1] < 0.5 * errs[0] and errs[2] < 0.5 * errs[1], errs
    assert errs[2] < 0.1, errs
    assert noise[1] < 0.5 * noise[0] and noise[2] < 0.5 * noise[1], noise

    # a law with random query-key matrices too (no closed-form limit): successive differences
    # of the gradient field shrink (Cauchy-type check of convergence)
    fields = []
    for L, M in ((2, 2), (8, 32), (32, 512)):
        kA, kV = jax.random.split(getkey())
        heads = mf.HeadMeasure(A=A_bar + 0.5 * jax.random.normal(kA, (L, M, d, d)),
                               V=V_bar + jax.random.normal(kV, (L, M, d, d)))
        sol = mf.explicit_adjoint(heads, tokens, risk)
        fields.append(mf.gradient_field(sol.states[L // 2], tokens.w, sol.adjoints[L // 2 + 1],
                                        probe))
    steps = [max(rel_err(a[k], b[k]) for k in probe) for a, b in zip(fields, fields[1:])]
    print("successive differences, random A and V:", steps)  # measured ≈ 0.76, 0.32
    assert steps[1] < 0.5 * steps[0], steps


# ---------------------------------------------------------------------------------------------
# Interface


def test_risk_and_gradient_under_jit(getkey):
    heads, tokens, risk = _problem(getkey)

    @eqx.filter_jit
    def step(h):
        loss, g = mf.risk_and_gradient(h, tokens, risk)
        return loss, eqx.tree_at(lambda t: t.params, h,
                                 jax.tree.map(lambda a, b: a - 0.1 * b, h.params, g.params))

    loss0, h1 = step(heads)
    loss1, _ = step(h1)
    assert float(loss1) < float(loss0)


def test_bad_inputs_raise_clear_errors(getkey):
    heads, tokens, risk = _problem(getkey)
    B, n, d = tokens.x.shape
    with pytest.raises(mf.InputError, match=r"targets y has shape \(2, 3, 2\)"):
        mf.risk_and_gradient(heads, tokens, mf.TokenRegression(jnp.zeros((B, n - 1, d))))
    with pytest.raises(mf.InputError, match="non-finite"):
        mf.TokenRegression(jnp.full((B, n, d), jnp.nan))
    with pytest.raises(mf.InputError, match="unknown gradient method"):
        mf.risk_and_gradient(heads, tokens, risk, method="autodiff")
    with pytest.raises(mf.InputError, match="readout query"):
        mf.risk_and_gradient(heads, tokens, mf.QueryRegression(jnp.zeros((B, d))))
    with pytest.raises(mf.InputError, match="dimension"):
        mf.risk_and_gradient(heads, tokens, mf.TokenRegression(jnp.zeros((B, n, d + 1))))
