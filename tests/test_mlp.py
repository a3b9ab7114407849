"""MLP units: the full transformer block (attention + MLP) against independent references.

References: the finite block written out as plain NumPy loops over layers, steps, sequences,
tokens, heads and units (`plain_block`, written here from the model's definition, not from the
library); float64 central finite differences of the risk along random directions; the explicit
adjoint against autodiff. Float64 everywhere. Tolerances: the forward and the gradient methods
compute the same sums in another order, so they agree to a few roundings (~1e-15 relative):
1e-12 leaves 1000x headroom and a missing term is O(1). Central differences with step 1e-5 have
truncation error ~ε² |R'''| ≈ 1e-10 and rounding ~1e-16/ε ≈ 1e-11 relative: 1e-7 is safe and a
wrong term is O(1).
"""

import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import meanfield_tf as mf
from meanfield_tf._euler_adjoint import euler_flow, euler_risk_and_gradient

from conftest import rel_err

RTOL = 1e-12
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "teacher_student_mlp.yaml"
FD_RTOL = 1e-7


def plain_block(params, interpolation, x, w, k, composition, act):
    """The finite block by hand: per Euler step (h = 1/(L k)), attention
    x_i += h (1/M) Σ_m V_m Σ_j softmax_j(x_iᵀ A_m x_j + log w_j) x_j, then the units
    (1/M') Σ_u U_u σ(W_u·x + b_u) evaluated at the step's start (sum) or after attention
    (sequential)."""
    p = {a: np.asarray(v, np.float64) for a, v in params.items()}
    x, w = np.array(x, np.float64), np.asarray(w, np.float64)
    N = p["V"].shape[0]
    L = N - 1 if interpolation == "linear" else N
    h = 1.0 / (L * k)
    B, n, d = x.shape
    for layer in range(L):
        for j in range(k):
            u = j / k
            th = {a: (1 - u) * v[layer] + u * v[layer + 1] if interpolation == "linear"
                  else v[layer] for a, v in p.items()}
            M, Mu = th["V"].shape[0], th["U"].shape[0]
            y = x.copy()
            for b in range(B):
                for i in range(n):
                    acc = np.zeros(d)
                    for m in range(M):
                        s = np.array([x[b, i] @ th["A"][m] @ x[b, l] for l in range(n)])
                        s = np.where(w[b] > 0, s + np.log(np.where(w[b] > 0, w[b], 1.0)), -np.inf)
                        e = np.exp(s - s.max())
                        acc += th["V"][m] @ ((e / e.sum()) @ x[b])
                    y[b, i] = x[b, i] + h * acc / M
            src = y if composition == "sequential" else x
            for b in range(B):
                for i in range(n):
                    acc = np.zeros(d)
                    for m in range(Mu):
                        acc += th["U"][m] * act(th["W"][m] @ src[b, i] + th["b"][m])
                    y[b, i] += h * acc / Mu
            x = y
    return x


ACTS = {"tanh": (mf.Tanh(), math.tanh),
        "gelu": (mf.GELU(), lambda z: 0.5 * z * (1 + math.erf(z / math.sqrt(2))))}


def make(getkey, L=2, M=2, Mu=3, d=2, B=2, n=4, interpolation="piecewise", zero=()):
    heads = mf.gaussian_heads(getkey(), L, M, d, mean_A=0.5, mean_V=0.7,
                              interpolation=interpolation, dtype=jnp.float64)
    units = mf.gaussian_units(getkey(), L, Mu, d, scale_U=2.0, scale_W=2.0, scale_b=0.5,
                              interpolation=interpolation, dtype=jnp.float64)
    x = jax.random.normal(getkey(), (B, n, d))
    w = np.array(jax.random.uniform(getkey(), (B, n), minval=0.5, maxval=1.5))
    for b, j in zero:
        w[b, j] = 0.0
    return heads.with_units(**units), mf.TokenBatch(x, w / w.sum(1, keepdims=True))


def solver(composition, act="tanh", k=1, **kw):
    return mf.DepthSolver(stepping=mf.FixedSteps(k),
                          block=mf.Block(ACTS[act][0], composition), **kw)


@pytest.mark.parametrize("composition, act, interpolation, k", [
    ("sum", "tanh", "piecewise", 1), ("sequential", "gelu", "linear", 2)])
def test_forward_matches_plain_loops(getkey, composition, act, interpolation, k):
    hu, tok = make(getkey, interpolation=interpolation, zero=((1, 2),))
    ref = plain_block(hu.params, interpolation, tok.x, tok.w, k, composition, ACTS[act][1])
    x1 = mf.flow(hu, tok, solver(composition, act, k)).x
    fused = euler_flow(hu, tok.x, tok.w, steps_per_layer=k, block=mf.Block(ACTS[act][0],
                                                                            composition))
    assert rel_err(x1, ref) <= RTOL and rel_err(fused, ref) <= RTOL
    # the units matter at O(1): attention alone and the other composition are far off
    zero = {**hu.params, "U": 0 * hu.params["U"]}
    assert rel_err(plain_block(zero, interpolation, tok.x, tok.w, k, composition, ACTS[act][1]),
                   ref) > 1e-2
    other = "sum" if composition == "sequential" else "sequential"
    assert rel_err(plain_block(hu.params, interpolation, tok.x, tok.w, k, other, ACTS[act][1]),
                   ref) > 1e-3


def _fd_check(loss_of, params, grads, scale, key):
    """Central differences of `loss_of(params)` along a random direction per key, against the
    mean-field gradients `grads` divided by their `scale` (∂R/∂θ = g / (L M))."""
    for name in params:
        key, sub = jax.random.split(key)
        delta = jax.random.normal(sub, params[name].shape, jnp.float64)
        eps = 1e-5
        plus = loss_of({**params, name: params[name] + eps * delta})
        minus = loss_of({**params, name: params[name] - eps * delta})
        fd = (float(plus) - float(minus)) / (2 * eps)
        an = float(jnp.sum(grads[name] * delta)) / scale[name]
        assert abs(an - fd) <= FD_RTOL * abs(fd), (name, an, fd)
        assert abs(fd) > 1e-3, name  # not trivially zero


@pytest.mark.parametrize("composition", ["sum", "sequential"])
def test_gradients_against_finite_differences(getkey, composition):
    """The default gradient (the fused discrete adjoint extended by the units) in A, V, U, W, b
    and the input tokens; the explicit adjoint's λ_0 is the token gradient too."""
    hu, tok = make(getkey, zero=((0, 3),))
    risk = mf.TokenRegression(jax.random.normal(getkey(), tok.x.shape))
    slv = solver(composition)

    def loss_of(params, x=tok.x):
        h = mf.HeadMeasure(**params, interpolation=hu.interpolation, check=False)
        return risk(euler_flow(h, x, tok.w, block=slv.block), tok.w)

    scale = hu.mean_field_scale()
    assert scale["A"] == 2 * 2 and scale["U"] == 2 * 3
    _, g, dx = euler_risk_and_gradient(hu, tok, risk, wrt_tokens=True, block=slv.block)
    _fd_check(loss_of, hu.params, g, scale, getkey())
    delta = jax.random.normal(getkey(), tok.x.shape)
    eps = 1e-5
    fd = (float(loss_of(hu.params, tok.x + eps * delta))
          - float(loss_of(hu.params, tok.x - eps * delta))) / (2 * eps)
    assert abs(float(jnp.sum(dx * delta)) - fd) <= FD_RTOL * abs(fd)
    # λ_0 is ∂J_i/∂X_0 per sequence; the risk is the batch mean
    lam0 = mf.explicit_adjoint(hu, tok, risk, solver=slv).adjoints[0]
    assert rel_err(lam0 / tok.batch_size, dx) <= RTOL


@pytest.mark.parametrize("composition, interpolation, kernel, reference", [
    ("sum", "linear", mf.DenseKernel(), mf.Autodiff(fused=False)),  # through diffrax
    ("sequential", "piecewise", mf.ChunkedKernel(3, 5), mf.Autodiff()),  # fused adjoint
])
def test_explicit_adjoint_equals_autodiff(getkey, composition, interpolation, kernel, reference):
    hu, tok = make(getkey, L=3, Mu=4, n=5, interpolation=interpolation, zero=((1, 0),))
    tok = tok.append_query(jnp.array([0.5, -0.5]))
    risk = mf.QueryRegression(jax.random.normal(getkey(), (2, 2)))
    slv = solver(composition, k=2, kernel=kernel)
    loss_a, ga = mf.risk_and_gradient(hu, tok, risk, method=reference, solver=slv)
    loss_e, ge = mf.risk_and_gradient(hu, tok, risk, method=mf.Explicit(), solver=slv)
    assert abs(float(loss_e) - float(loss_a)) <= RTOL * abs(float(loss_a))
    assert set(ge.params) == set(ga.params) == {"A", "V", "U", "W", "b"}
    for name in ga.params:
        assert rel_err(ge.params[name], ga.params[name]) <= RTOL, name
        assert float(jnp.abs(ga.params[name]).max()) > 1e-3, name


@pytest.mark.slow
def test_sum_with_adaptive_solver_and_the_common_depth_limit(getkey):
    """`sum` is a vector field: Tsit5 with error control integrates it (explicit adjoint = the
    continuous adjoint ODE, close to autodiff); `sequential` and `sum` with k Euler steps per
    layer converge to the same limit, their gap shrinking like 1/k."""
    hu, tok = make(getkey, L=2, n=4)
    tight = mf.DepthSolver(diffrax_tsit5(), mf.AdaptiveSteps(1e-10, 1e-10))
    limit = mf.flow(hu, tok, tight).x
    gaps = [float(jnp.abs(mf.flow(hu, tok, solver(c, k=k)).x - limit).max())
            for k in (8, 16) for c in ("sum", "sequential")]
    # each composition's Euler error halves with k (first order)
    assert 1.8 < gaps[0] / gaps[2] < 2.2 and 1.8 < gaps[1] / gaps[3] < 2.2
    risk = mf.TokenRegression(jnp.zeros_like(tok.x))
    _, ga = mf.risk_and_gradient(hu, tok, risk, solver=tight)
    _, ge = mf.risk_and_gradient(hu, tok, risk, method=mf.Explicit(), solver=tight)
    for name in ga.params:
        assert rel_err(ge.params[name], ga.params[name]) <= 1e-7, name


def diffrax_tsit5():
    import diffrax

    return diffrax.Tsit5()


def test_padding_invariance(getkey):
    """Zero-weight tokens change neither the real tokens' outputs nor the gradients."""
    hu, tok = make(getkey, B=1, n=4)
    pad = mf.TokenBatch(jnp.concatenate([tok.x, jax.random.normal(getkey(), (1, 3, 2))], 1),
                        jnp.concatenate([tok.w, jnp.zeros((1, 3))], 1))
    block = mf.Block(composition="sequential")
    assert rel_err(euler_flow(hu, pad.x, pad.w, block=block)[:, :4],
                   euler_flow(hu, tok.x, tok.w, block=block)) <= RTOL
    t = jax.random.normal(getkey(), tok.x.shape)
    tp = jnp.concatenate([t, jnp.ones((1, 3, 2))], 1)  # zero weight: no loss there
    _, g = euler_risk_and_gradient(hu, tok, mf.TokenRegression(t), block=block)
    _, gp = euler_risk_and_gradient(hu, pad, mf.TokenRegression(tp), block=block)
    for name in g:
        assert rel_err(gp[name], g[name]) <= RTOL, name


def test_zero_units_reproduce_attention_only(getkey):
    """Units with u = 0 add exactly nothing: the flow and the head gradients are bit for bit
    those of the attention-only heads."""
    hu, tok = make(getkey)
    zero = hu.with_units(U=jnp.zeros_like(hu.params["U"]), W=hu.params["W"], b=hu.params["b"])
    heads = hu.without_units()
    assert np.array_equal(mf.flow(zero, tok).x, mf.flow(heads, tok).x)
    risk = mf.TokenRegression(jax.random.normal(getkey(), tok.x.shape))
    _, g0 = euler_risk_and_gradient(zero, tok, risk, block=mf.Block(composition="sequential"))
    _, g = euler_risk_and_gradient(heads, tok, risk)
    for name in g:
        assert np.array_equal(g0[name], g[name]), name
    assert not heads.has_units and heads.num_units == 0 and hu.num_units == 3


def test_activation_derivatives():
    """Closed-form σ' against central differences (step 1e-6: error ~1e-11)."""
    z = np.linspace(-3.0, 3.0, 61) + 0.01  # off the ReLU kink
    for act in (mf.Tanh(), mf.ReLU(), mf.GELU()):
        fd = (np.asarray(act(jnp.asarray(z + 1e-6))) - np.asarray(act(jnp.asarray(z - 1e-6)))) / 2e-6
        assert np.abs(np.asarray(act.derivative(jnp.asarray(z))) - fd).max() <= 1e-8
    assert float(mf.GELU()(jnp.array(1.0))) == pytest.approx(0.8413447460685429, rel=1e-14)


def test_gradient_norm_is_the_descent_rate(getkey):
    """Along -g the risk decreases at rate ‖g‖² with each family normalised by its own count
    (L M heads, L M' units): the gradients' scaling and the norm are consistent."""
    hu, tok = make(getkey)
    risk = mf.TokenRegression(jax.random.normal(getkey(), tok.x.shape))
    _, g = euler_risk_and_gradient(hu, tok, risk)
    eps = 1e-5

    def loss(t):
        p = {k: v - t * g[k] for k, v in hu.params.items()}
        return float(euler_risk_and_gradient(mf.HeadMeasure(**p), tok, risk)[0])

    rate = (loss(eps) - loss(-eps)) / (2 * eps)  # dR/dt along the flow = -‖g‖²
    assert rate == pytest.approx(-float(mf.particle_norm(g)) ** 2, rel=FD_RTOL)


@pytest.mark.slow
def test_ntk_blocks_with_units(getkey):
    """The NTK's full Gram is the sum of its blocks with factors L M (heads), L M' (units)."""
    hu, tok = make(getkey, n=3)
    tok = tok.append_query(jnp.array([0.3, 0.2]))
    blocks = mf.ntk_blocks(hu, tok, output=mf.ReadoutQuery(jnp.array([0.3, 0.2])))
    jac = mf.ntk_jacobian(hu, tok, output=mf.ReadoutQuery(jnp.array([0.3, 0.2])))
    scale = hu.mean_field_scale()
    for k, j in jac.items():
        flat = j.reshape(4, -1)
        assert rel_err(blocks[k].gram, scale[k] * flat @ flat.T) <= RTOL
    assert rel_err(blocks["full"].gram, sum(blocks[k].gram for k in hu.params)) <= RTOL


def test_training_moves_both_families_and_resumes_bit_identically(tmp_path):
    from meanfield_tf.workflow.build import run as build_run
    from meanfield_tf.workflow.config import load_train_config
    from meanfield_tf.workflow.rundir import RunDir
    from meanfield_tf.workflow.training import train

    config = CONFIG
    tiny = ["dtype=float64", "heads.layers=2", "heads.heads=4", "heads.units=6",
            "task.tokens.n=5", "train.log_every=1", "train.eval_every=4",
            "train.checkpoint_every=4"]
    full = load_train_config(config, tiny + ["train.steps=8"])
    summary = train(full, tmp_path / "full", progress=False, figures=False)
    assert summary["loss"] < 0.5 * summary["first_loss"]
    assert summary["w2_units"] > 0 and summary["w2"] > 0
    run = build_run(full)
    end = RunDir(tmp_path / "full").load_checkpoint(run.initial_state())
    for name in ("U", "W", "b"):
        assert not np.allclose(end.heads.params[name], run.heads0.params[name]), name
    train(load_train_config(config, tiny + ["train.steps=4"]), tmp_path / "short", progress=False,
          figures=False)
    train(full, tmp_path / "short", resume=True, progress=False, figures=False)
    again = RunDir(tmp_path / "short").load_checkpoint(run.initial_state())
    for name, value in end.heads.params.items():
        assert np.array_equal(np.asarray(value), np.asarray(again.heads.params[name])), name
    # export / load_run round-trip the units
    heads = mf.load_run(tmp_path / "full").heads()
    for name, value in end.heads.params.items():
        assert np.array_equal(np.asarray(heads.params[name]), np.asarray(value)), name


@pytest.mark.parametrize("units, message", [
    (dict(U=np.zeros((2, 3, 3)), W=np.zeros((2, 3, 3)), b=np.zeros((2, 3))), "expected \\(N, M', d\\)"),
    (dict(U=np.zeros((2, 3, 2)), W=np.zeros((2, 4, 2)), b=np.zeros((2, 3))), "units W has shape"),
    (dict(U=np.zeros((2, 3, 2)), W=np.zeros((2, 3, 2)), b=np.zeros((2, 4))), "units b has shape"),
    (dict(U=np.zeros((3, 3, 2)), W=np.zeros((3, 3, 2)), b=np.zeros((3, 3))), "depth cells"),
    (dict(U=np.full((2, 3, 2), np.nan), W=np.zeros((2, 3, 2)), b=np.zeros((2, 3))), "NaN|finite"),
    (dict(U=np.zeros((2, 3, 2))), "need all of U, W and b"),
])
def test_bad_units_raise(getkey, units, message):
    heads = mf.gaussian_heads(getkey(), 2, 2, 2, dtype=jnp.float64)
    with pytest.raises(mf.InputError, match=message):
        mf.HeadMeasure(A=heads.A, V=heads.V, **units)


def test_bad_block_options_raise():
    hu = mf.gaussian_heads(jax.random.PRNGKey(0), 1, 1, 2).with_units(
        **mf.gaussian_units(jax.random.PRNGKey(1), 1, 2, 2))
    with pytest.raises(mf.InputError, match="do not keep Gaussians Gaussian"):
        mf.gaussian_flow(hu, jnp.zeros(2), jnp.eye(2))
    with pytest.raises(mf.InputError, match="needs diffrax.Euler\\(\\) with FixedSteps"):
        mf.DepthSolver(diffrax_tsit5(), mf.AdaptiveSteps(), block=mf.Block(composition="sequential"))
    with pytest.raises(mf.InputError, match="composition must be one of"):
        mf.Block(composition="parallel")
    with pytest.raises(mf.InputError, match="activation must be"):
        mf.Block(activation="tanh")
    from meanfield_tf.workflow.config import load_train_config

    for bad, message in [("heads.units=-1", "heads.units must be >= 0"),
                         ("heads.activation=sigmoid", "heads.activation must be one of"),
                         ("heads.block=parallel", "heads.block must be"),
                         ("heads.unitz=3", "unknown key")]:
        with pytest.raises(mf.MeanFieldError, match=message):
            load_train_config(CONFIG, [bad])
