"""Risks: values against plain NumPy loops, terminal adjoints against finite differences."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import meanfield_tf as mf
from conftest import rel_err


def _batch(getkey, B=3, n=4, d=2, query=False):
    w = jax.random.uniform(getkey(), (B, n), minval=0.2, maxval=1.0)
    w = w / w.sum(axis=1, keepdims=True)
    tokens = mf.TokenBatch(jax.random.normal(getkey(), (B, n, d)), w)
    if query:
        tokens = tokens.append_query(jnp.full((d,), 0.5))
    return tokens


def _fd_adjoint(risk, x, w, h=1e-3, losses=None):
    """∂J_i/∂X_i by Richardson-extrapolated central differences (all coordinates at once)."""
    x = jnp.asarray(x)
    dirs = jnp.eye(x.size, dtype=x.dtype).reshape((x.size,) + x.shape)
    losses = losses or jax.jit(jax.vmap(lambda xx: risk.losses(xx, w)))
    seq = np.unravel_index(np.arange(x.size), x.shape)[0]  # the sequence each coordinate is in

    def central(step):
        diff = (losses(x + step * dirs) - losses(x - step * dirs)) / (2 * step)
        return np.asarray(diff)[np.arange(x.size), seq]

    return ((4 * central(h / 2) - central(h)) / 3).reshape(x.shape)


def test_token_regression(getkey):
    tokens = _batch(getkey)
    B, n, d = tokens.x.shape
    y = jax.random.normal(getkey(), (B, n, 3))
    P = jax.random.normal(getkey(), (3, d))
    risk = mf.TokenRegression(y, readout=P)
    risk.validate(tokens)
    x, w = np.asarray(tokens.x), np.asarray(tokens.w)
    ref = np.zeros(B)
    for i in range(B):
        for k in range(n):
            r = np.asarray(P) @ x[i, k] - np.asarray(y)[i, k]
            ref[i] += w[i, k] * 0.5 * r @ r
    assert rel_err(risk.losses(tokens.x, tokens.w), ref) < 1e-14
    assert abs(float(risk(tokens.x, tokens.w)) - ref.mean()) < 1e-14 * ref.mean()
    lam = risk.terminal_adjoint(tokens.x, tokens.w)
    assert rel_err(lam, _fd_adjoint(risk, tokens.x, tokens.w)) < 1e-9
    # identity readout by default
    plain = mf.TokenRegression(tokens.x + 1.0)
    assert rel_err(plain.losses(tokens.x, tokens.w), 0.5 * d * np.ones(B)) < 1e-14


def test_query_regression_and_classification(getkey):
    tokens = _batch(getkey, query=True)
    B, _, d = tokens.x.shape
    xe = np.asarray(tokens.x[:, -1])
    y = jax.random.normal(getkey(), (B, d))
    reg = mf.QueryRegression(y)
    reg.validate(tokens)
    assert rel_err(reg.losses(tokens.x, tokens.w), 0.5 * ((xe - np.asarray(y)) ** 2).sum(1)) < 1e-14
    C = 4
    P = np.asarray(jax.random.normal(getkey(), (C, d)))
    labels = np.array([3, 0, 1])
    clf = mf.QueryClassification(labels, P)
    clf.validate(tokens)
    ref = []
    for i in range(B):
        logits = P @ xe[i]
        ref.append(np.log(np.exp(logits).sum()) - logits[labels[i]])
    assert rel_err(clf.losses(tokens.x, tokens.w), np.array(ref)) < 1e-14
    for risk in (reg, clf):
        lam = np.asarray(risk.terminal_adjoint(tokens.x, tokens.w))
        assert np.all(lam[:, :-1] == 0)  # only the query token is read out
        assert rel_err(lam, _fd_adjoint(risk, tokens.x, tokens.w)) < 1e-9


def _numpy_sinkhorn_cost(x, a, y, b, eps, iters=20000):
    """Entropic OT cost ⟨f, a⟩ + ⟨g, b⟩ at the fixed point of log-domain Sinkhorn, |x - y|² cost."""
    from scipy.special import logsumexp

    x, a = x[a > 0], a[a > 0]
    C = ((x[:, None, :] - y[None, :, :]) ** 2).sum(-1)
    f, g = np.zeros(len(a)), np.zeros(len(b))
    for _ in range(iters):
        f = -eps * logsumexp((g[None, :] - C) / eps + np.log(b)[None, :], axis=1)
        g_new = -eps * logsumexp((f[:, None] - C) / eps + np.log(a)[:, None], axis=0)
        if np.abs(g_new - g).max() < 1e-15:
            break
        g = g_new
    return f @ a + g @ b


def test_sinkhorn_risk(getkey):
    tokens = _batch(getkey, B=2, n=4, query=True)  # the zero-weight query must be ignored
    B, _, d = tokens.x.shape
    y = jax.random.normal(getkey(), (B, 3, d))
    yw = jnp.array([[0.2, 0.3, 0.5], [0.4, 0.4, 0.2]])
    eps = 0.5
    risk = mf.SinkhornRisk(y, yw, epsilon=eps)
    risk.validate(tokens)
    x, w, yn, ywn = (np.asarray(a) for a in (tokens.x, tokens.w, y, yw))
    ref = [
        _numpy_sinkhorn_cost(x[i], w[i], yn[i], ywn[i], eps)
        - 0.5 * _numpy_sinkhorn_cost(x[i], w[i], x[i][w[i] > 0], w[i][w[i] > 0], eps)
        - 0.5 * _numpy_sinkhorn_cost(yn[i], ywn[i], yn[i], ywn[i], eps)
        for i in range(B)
    ]
    losses = jax.jit(jax.vmap(lambda xx: risk.losses(xx, tokens.w)))  # one compile for all
    got = losses(tokens.x[None])[0]
    assert rel_err(got, np.array(ref)) < 1e-8
    lam = np.asarray(risk.terminal_adjoint(tokens.x, tokens.w))
    assert np.all(lam[:, -1] == 0)
    assert rel_err(lam, _fd_adjoint(risk, tokens.x, tokens.w, losses=losses)) < 1e-6


def test_bad_targets(getkey):
    tokens = _batch(getkey)
    B, n, d = tokens.x.shape
    with pytest.raises(mf.InputError, match=r"expected \(B, n, d\)"):
        mf.TokenRegression(jnp.zeros((B, n)))
    with pytest.raises(mf.InputError, match="non-finite"):
        mf.TokenRegression(jnp.zeros((B, n, d)).at[0, 1, 0].set(jnp.inf))
    with pytest.raises(mf.InputError, match="shape"):
        mf.TokenRegression(jnp.zeros((B + 1, n, d))).validate(tokens)
    with pytest.raises(mf.InputError, match="readout"):
        mf.TokenRegression(jnp.zeros((B, n, d)), readout=jnp.eye(d + 1)).validate(tokens)
    with pytest.raises(mf.InputError, match="non-finite"):
        mf.QueryRegression(jnp.full((B, d), jnp.nan))
    with pytest.raises(mf.InputError, match="readout query"):
        mf.QueryRegression(jnp.zeros((B, d))).validate(tokens)
    with pytest.raises(mf.InputError, match="labels must lie"):
        mf.QueryClassification(jnp.array([0, 5, 1]), jnp.eye(3, d))
    with pytest.raises(mf.InputError, match="integer"):
        mf.QueryClassification(jnp.array([0.0, 1.0, 1.0]), jnp.eye(3, d))
    with pytest.raises(mf.InputError, match="epsilon"):
        mf.SinkhornRisk(jnp.zeros((B, 2, d)), epsilon=-1.0)
    with pytest.raises(mf.InputError, match="sum to 1"):
        mf.SinkhornRisk(jnp.zeros((B, 2, d)), jnp.ones((B, 2)))
