"""Tokens on the unit sphere (`DepthSolver(geometry=Sphere())`).

References are independent of the code under test: plain NumPy loops of the normalised finite
transformer and an RK4 of the tangent-projected field, float64 finite differences of the flow.
"""

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import meanfield_tf as mf
import meanfield_tf._gradients as gradients_module
from conftest import rel_err

SPHERE = mf.DepthSolver(geometry=mf.Sphere())


def _problem(getkey, *, B=2, n=5, d=3, L=3, M=2):
    heads = mf.gaussian_heads(getkey(), L, M, d, scale_A=1.5, scale_V=1.5)
    x = jax.random.normal(getkey(), (B, n, d))  # not on the sphere: the flow normalises them
    w = jax.random.uniform(getkey(), (B, n), minval=0.2, maxval=1.0).at[:, -1].set(0.0)
    return heads, mf.TokenBatch(x, w / w.sum(1, keepdims=True))


def _velocity(x, w, A, V):
    """(1/M) sum_m V_m sum_j softmax_j(x_i^T A_m x_j + log w_j) x_j, by NumPy loops."""
    v = np.zeros_like(x)
    for b in range(x.shape[0]):
        for m in range(A.shape[0]):
            s = x[b] @ A[m] @ x[b].T
            s = s + np.log(np.where(w[b] > 0, w[b], 1.0)) + np.where(w[b] > 0, 0, -np.inf)
            p = np.exp(s - s.max(1, keepdims=True))
            p /= p.sum(1, keepdims=True)
            v[b] += (p @ x[b]) @ V[m].T / A.shape[0]
    return v


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _numpy_sphere_transformer(x, w, A, V, k):
    """Normalised Euler, k steps per layer: X <- (X + h v(X)) / |X + h v(X)|, h = 1/(L k)."""
    L = A.shape[0]
    x = _unit(np.array(x))
    states = [x]
    for l in range(L):
        for _ in range(k):
            x = _unit(x + _velocity(x, w, A[l], V[l]) / (L * k))
        states.append(x)
    return np.stack(states)


def _numpy_tangent_rk4(x, w, A, V, k):
    """RK4 with k steps per layer of dx/ds = v - <x, v> x / |x|^2 (piecewise-constant layers)."""
    L = A.shape[0]
    x = _unit(np.array(x))
    h = 1.0 / (L * k)
    for l in range(L):
        def f(y):
            v = _velocity(y, w, A[l], V[l])
            return v - np.sum(y * v, -1, keepdims=True) / np.sum(y * y, -1, keepdims=True) * y
        for _ in range(k):
            k1 = f(x)
            k2 = f(x + h / 2 * k1)
            k3 = f(x + h / 2 * k2)
            k4 = f(x + h * k3)
            x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return x


@pytest.mark.parametrize("k", [1, 3])
def test_finite_transformer_on_sphere_matches_numpy_loop(getkey, k):
    heads, tokens = _problem(getkey)
    sol = mf.flow(heads, tokens, mf.DepthSolver(stepping=mf.FixedSteps(k), geometry=mf.Sphere()))
    ref = _numpy_sphere_transformer(np.asarray(tokens.x), np.asarray(tokens.w),
                                    np.asarray(heads.A), np.asarray(heads.V), k)
    xs = np.asarray(sol.xs)
    assert np.abs(np.linalg.norm(xs, axis=-1) - 1).max() <= 1e-12
    assert np.abs(xs - ref).max() <= 1e-12
    # the same heads without the sphere give another map: the option is not ignored
    assert np.abs(np.asarray(mf.flow(heads, tokens).x) - ref[-1]).max() > 1e-2


def test_continuous_sphere_is_the_tangent_field(getkey):
    """Tsit5 on the tangent-projected field: on the sphere within the tolerance, and equal to an
    independent RK4 of dx/ds = P_x v(x)."""
    heads, tokens = _problem(getkey)
    solver = mf.DepthSolver(diffrax.Tsit5(), mf.AdaptiveSteps(1e-11, 1e-11), geometry=mf.Sphere())
    sol = mf.flow(heads, tokens, solver).check()
    assert np.abs(np.linalg.norm(np.asarray(sol.xs), axis=-1) - 1).max() <= 1e-9
    ref = _numpy_tangent_rk4(np.asarray(tokens.x), np.asarray(tokens.w), np.asarray(heads.A),
                             np.asarray(heads.V), 64)
    assert np.abs(np.asarray(sol.x) - ref).max() <= 1e-8


def test_input_rule_normalises_and_maps_zero_to_e1(getkey):
    heads, tokens = _problem(getkey, B=1, n=3)
    x = jnp.array([[[3.0, 4.0, 0.0], [0.0, 0.0, 0.0], [0.0, -2.0, 0.0]]])
    sol = mf.flow(heads, mf.TokenBatch(x, jnp.array([[0.5, 0.0, 0.5]])), SPHERE)
    np.testing.assert_allclose(np.asarray(sol.xs[0, 0]),
                               [[0.6, 0.8, 0.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]], atol=1e-15)


def _fd_gradient(heads, tokens, risk, solver, h=1e-3):
    """L M dR/dθ by Richardson-extrapolated central differences of `flow` (every coordinate)."""
    flat, unravel = ravel_pytree(heads.params)

    def loss(v):
        hh = eqx.tree_at(lambda t: t.params, heads, unravel(v))
        return risk(mf.flow(hh, tokens, solver).x, tokens.w)

    dirs = jnp.eye(flat.size, dtype=flat.dtype)
    loss_v = jax.jit(jax.vmap(loss))

    def central(step):
        return (loss_v(flat + step * dirs) - loss_v(flat - step * dirs)) / (2 * step)

    return unravel(heads.num_layers * heads.num_heads * (4 * central(h / 2) - central(h)) / 3)


@pytest.mark.parametrize("solver", [SPHERE, mf.DepthSolver(diffrax.Heun(), mf.FixedSteps(2),
                                                           geometry=mf.Sphere())],
                         ids=["finite", "continuous"])
def test_sphere_gradients_match_finite_differences(getkey, solver, monkeypatch):
    heads, tokens = _problem(getkey, n=4, d=2, L=2)
    risk = mf.TokenRegression(jax.random.normal(getkey(), tokens.x.shape))
    ref = _fd_gradient(heads, tokens, risk, solver)

    def no_fused(*args, **kwargs):
        raise AssertionError("the fused Euclidean adjoint was used in sphere mode")

    monkeypatch.setattr(gradients_module, "_fused", no_fused)
    loss, grads = mf.risk_and_gradient(heads, tokens, risk, solver=solver)  # fused=True default
    assert float(loss) == pytest.approx(float(risk(mf.flow(heads, tokens, solver).x, tokens.w)),
                                        rel=1e-14)
    for name in heads.params:
        assert rel_err(grads.params[name], ref[name]) <= 1e-8, name
    # the patch is live: the Euclidean finite transformer does take the fused path
    with pytest.raises(AssertionError, match="fused"):
        mf.risk_and_gradient(heads, tokens, risk)


def test_explicit_and_gaussian_flow_refuse_the_sphere(getkey):
    heads, tokens = _problem(getkey)
    risk = mf.TokenRegression(jnp.zeros_like(tokens.x))
    with pytest.raises(mf.InputError, match="sphere"):
        mf.risk_and_gradient(heads, tokens, risk, method=mf.Explicit(), solver=SPHERE)
    with pytest.raises(mf.InputError, match="sphere"):
        mf.gaussian_flow(heads, jnp.zeros(3), jnp.eye(3), SPHERE)
    with pytest.raises(mf.InputError, match="geometry"):
        mf.DepthSolver(geometry="sphere")


def test_pure_attention_shrinks_a_cap_to_a_point(getkey):
    """V = T I, A = β I, tokens in a cap of angular radius 0.5: every normalised step maps each
    token into the cone of the others, so the diameter never grows, and the cluster collapses."""
    n, d, L, T, beta = 8, 3, 200, 30.0, 1.0
    u = jax.random.normal(getkey(), (n, d)) * 0.3
    x = jnp.concatenate([u[:, :2], jnp.ones((n, 1))], axis=1)  # directions near the north pole
    eye = jnp.broadcast_to(jnp.eye(d), (L, 1, d, d))
    heads = mf.HeadMeasure(A=beta * eye, V=T * eye)
    xs = np.asarray(mf.flow(heads, mf.TokenBatch(x[None]), SPHERE).xs[:, 0])
    diam = np.linalg.norm(xs[:, :, None] - xs[:, None], axis=-1).max(axis=(1, 2))
    assert diam[0] > 0.3
    assert np.all(np.diff(diam) <= 1e-12)
    assert diam[-1] < 1e-6 * diam[0]


def test_simulate_sphere_config_and_flag(tmp_path):
    from meanfield_tf.cli import main

    out = tmp_path / "s.npz"
    assert main(["simulate", "--config", "configs/simulate_sphere.yaml", "--out", str(out),
                 "heads.layers=6", "tokens.n=6"]) == 0
    xs = np.load(out)["xs"]
    assert xs.shape == (7, 2, 6, 3)
    assert np.abs(np.linalg.norm(xs, axis=-1) - 1).max() <= 1e-12
    # --sphere on a Euclidean config (with zero padding tokens, mapped to e_1)
    out = tmp_path / "c.npz"
    assert main(["simulate", "--config", "configs/simulate_families.yaml", "--out", str(out),
                 "--sphere", "--dtype", "float64", "heads.layers=2", "heads.heads=2",
                 "tokens.n=6"]) == 0
    assert np.abs(np.linalg.norm(np.load(out)["xs"], axis=-1) - 1).max() <= 1e-12


def test_train_config_sphere_key_builds_the_sphere_solver():
    from meanfield_tf.workflow import build
    from meanfield_tf.workflow.config import load_train_config

    cfg = load_train_config(None, ["solver.sphere=true"])
    assert isinstance(build.depth_solver(cfg.solver, 2).geometry, mf.Sphere)
    assert isinstance(build.depth_solver(load_train_config(None, []).solver, 2).geometry,
                      mf.Euclidean)
    with pytest.raises(mf.ConfigError, match="sphere"):
        load_train_config(None, ["solver.sphere=maybe"])
