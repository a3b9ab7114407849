"""The fused discrete adjoint of the finite transformer against autodiff through the dense kernel.

References: reverse-mode autodiff through the finite transformer written out as a loop of
Euler steps with the dense kernel (softmax over the full `(M, n, n)` scores), for the heads and
for the input tokens; and, once each, the public `risk_and_gradient(..., method=Autodiff(fused=False),
kernel=DenseKernel())` (checkpointed reverse mode through diffrax) and `jax.grad` through
`flow(...).x`. All compute the same sums as the fused path in another order (online log-sum-exp, row blocks, key
chunks), so in float64 they differ by a few roundings per term, ~1e-15 relative: 1e-12 leaves
1000x headroom and still catches any missing term (a dropped key, value or query role of the
tokens, or a wrong interpolation weight, changes the gradient at O(1)).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import meanfield_tf as mf
from meanfield_tf._euler_adjoint import euler_flow, euler_risk_and_gradient

from conftest import rel_err

RTOL = 1e-12


def make_tokens(getkey, B, n, d, zero=()):
    x = jax.random.normal(getkey(), (B, n, d))
    w = np.array(jax.random.uniform(getkey(), (B, n), minval=0.5, maxval=1.5))
    for b, j in zero:
        w[b, j] = 0.0
    return mf.TokenBatch(x, w / w.sum(axis=1, keepdims=True))


def make_heads(getkey, L, M, d, *, rank=None, interpolation="piecewise"):
    # mean_A, mean_V: visible token motion, so the key/value terms matter at O(1)
    if rank is None:
        return mf.gaussian_heads(getkey(), L, M, d, mean_A=0.5, mean_V=0.7,
                                 interpolation=interpolation, dtype=jnp.float64)
    return mf.gaussian_heads(getkey(), L, M, d, mean_V=0.7, scale_A=2.0, rank=rank,
                             interpolation=interpolation, dtype=jnp.float64)


def dense_euler(params, interpolation, x, w, k):
    """The finite transformer written out: a Python loop of Euler steps X + h v(X), v the dense
    kernel (full (M, n, n) softmax), θ interpolated by hand for linear heads."""
    names = sorted(params)
    N = params["V"].shape[0]
    L = N - 1 if interpolation == "linear" else N
    h = 1.0 / (L * k)
    velocity = jax.vmap(mf.DenseKernel(), in_axes=(0, 0, None, None))
    for layer in range(L):
        for j in range(k):
            if interpolation == "linear":
                u = j / k
                theta = {a: (1 - u) * params[a][layer] + u * params[a][layer + 1] for a in names}
            else:
                theta = {a: params[a][layer] for a in names}
            A = theta["A"] if "A" in theta else theta["Q"].swapaxes(-1, -2) @ theta["K"]
            x = x + h * velocity(x, w, A, theta["V"])
    return x


def reference(heads, tokens, risk, k):
    """Loss, mean-field gradient (L M dR/dθ) and dR/dx by reverse-mode autodiff through
    `dense_euler` (what `Autodiff()` with the dense kernel computes)."""

    @jax.jit
    def loss_and_grads(params, x):
        def loss(params, x):
            return risk(dense_euler(params, heads.interpolation, x, tokens.w, k), tokens.w)

        return jax.value_and_grad(loss, argnums=(0, 1))(params, x)

    loss, (grads, dx) = loss_and_grads(heads.params, tokens.x)
    scale = heads.num_layers * heads.num_heads
    return loss, {name: scale * g for name, g in grads.items()}, dx


def check(heads, tokens, risk, k=1, **options):
    loss, grads, dx = euler_risk_and_gradient(heads, tokens, risk, steps_per_layer=k,
                                              wrt_tokens=True, **options)
    ref_loss, ref_grads, ref_dx = reference(heads, tokens, risk, k)
    assert abs(float(loss) - float(ref_loss)) <= RTOL * abs(float(ref_loss))
    assert set(grads) == set(ref_grads)
    for name in ref_grads:
        assert grads[name].shape == ref_grads[name].shape
        assert rel_err(grads[name], ref_grads[name]) <= RTOL, name
    assert rel_err(dx, ref_dx) <= RTOL
    # the gradients are not trivially small: the comparison means something
    assert all(float(jnp.abs(g).max()) > 1e-3 for g in ref_grads.values())
    return grads


# n = 7 tokens, chunk 3 (does not divide n: the last chunk is padded), 4 heads => 28 rows in
# blocks of 5 (not dividing either); zero weights in the middle and at the end of a sequence
PADDING = ((0, 2), (0, 6), (1, 0))


def test_padding_chunks_blocks(getkey):
    tokens = make_tokens(getkey, 2, 7, 3, zero=PADDING)
    heads = make_heads(getkey, 3, 4, 3)
    risk = mf.TokenRegression(jax.random.normal(getkey(), (2, 7, 3)))
    grads = check(heads, tokens, risk, chunk_size=3, block_rows=5)
    # the public gradient API (Autodiff through diffrax and the dense kernel) returns the same,
    # and its default (fused) path is this one
    _, api = mf.risk_and_gradient(heads, tokens, risk, method=mf.Autodiff(fused=False),
                                  solver=mf.DepthSolver(kernel=mf.DenseKernel()))
    _, default = mf.risk_and_gradient(heads, tokens, risk,
                                      solver=mf.DepthSolver(kernel=mf.ChunkedKernel(3, 5)))
    for name in grads:
        assert rel_err(grads[name], api.params[name]) <= RTOL
        assert rel_err(default.params[name], api.params[name]) <= RTOL


def test_factored_query_regression_two_steps(getkey):
    tokens = make_tokens(getkey, 3, 5, 4, zero=((2, 1),)).append_query(jnp.ones(4) / 2)
    heads = make_heads(getkey, 2, 3, 4, rank=2)
    risk = mf.QueryRegression(jax.random.normal(getkey(), (3, 2)),
                              readout=jax.random.normal(getkey(), (2, 4)))
    check(heads, tokens, risk, k=2, chunk_size=4, block_rows=7)


def test_linear_interpolation(getkey):
    tokens = make_tokens(getkey, 2, 6, 3, zero=((1, 5),))
    heads = make_heads(getkey, 2, 3, 3, interpolation="linear")
    risk = mf.TokenRegression(jax.random.normal(getkey(), (2, 6, 3)))
    check(heads, tokens, risk, k=3, chunk_size=4, block_rows=4)


def test_flow_matches_and_differentiates_in_weights(getkey):
    """`euler_flow` is `flow(...).x`, and `jax.grad` through it (in x, w, heads) is autodiff's."""
    tokens = make_tokens(getkey, 2, 6, 3, zero=((0, 3),))
    heads = make_heads(getkey, 2, 3, 3)
    k = 2
    x1 = euler_flow(heads, tokens.x, tokens.w, steps_per_layer=k)  # defaults: one key chunk
    ref = mf.flow(heads, tokens, mf.DepthSolver(stepping=mf.FixedSteps(k))).x
    assert rel_err(x1, ref) <= RTOL

    target = jax.random.normal(getkey(), x1.shape)

    def ours(params, x, w):
        h = mf.HeadMeasure(**params, check=False)
        return jnp.sum(jnp.sin(euler_flow(h, x, w, steps_per_layer=k, chunk_size=4)) * target)

    def dense(params, x, w):
        h = mf.HeadMeasure(**params, check=False)
        sol = mf.flow(h, mf.TokenBatch(x, w, check=False), mf.DepthSolver(stepping=mf.FixedSteps(k)))
        return jnp.sum(jnp.sin(sol.x) * target)

    args = (heads.params, tokens.x, tokens.w)
    got = jax.grad(ours, argnums=(0, 1, 2))(*args)
    want = jax.grad(dense, argnums=(0, 1, 2))(*args)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert rel_err(a, b) <= RTOL


def test_float32_close(getkey):
    """Float32 inputs run in float32 and agree with the float64 gradient to float32 accuracy."""
    tokens = make_tokens(getkey, 2, 6, 3)
    heads = make_heads(getkey, 2, 3, 3)
    risk = mf.TokenRegression(jax.random.normal(getkey(), (2, 6, 3)))
    _, g64 = euler_risk_and_gradient(heads, tokens, risk)
    t32 = mf.TokenBatch(tokens.x.astype(jnp.float32), tokens.w.astype(jnp.float32))
    r32 = mf.TokenRegression(risk.y.astype(jnp.float32))
    _, g32 = euler_risk_and_gradient(heads.astype(jnp.float32), t32, r32)
    for name in g64:
        assert g32[name].dtype == jnp.float32
        assert rel_err(g32[name], g64[name]) <= 1e-4


@pytest.mark.parametrize("options, match", [
    ({"steps_per_layer": 0}, "steps_per_layer"),
    ({"chunk_size": 0}, "chunk_size"),
    ({"block_rows": 0}, "block_rows"),
])
def test_bad_options(getkey, options, match):
    tokens = make_tokens(getkey, 1, 4, 2)
    heads = make_heads(getkey, 1, 2, 2)
    risk = mf.TokenRegression(jnp.zeros((1, 4, 2)))
    with pytest.raises(mf.InputError, match=match):
        euler_risk_and_gradient(heads, tokens, risk, **options)


def test_bad_risk_and_dtype(getkey):
    tokens = make_tokens(getkey, 1, 4, 2)
    heads = make_heads(getkey, 1, 2, 2)
    with pytest.raises(mf.InputError, match="risk"):
        euler_risk_and_gradient(heads, tokens, lambda x, w: 0.0)
    with pytest.raises(mf.InputError, match="float32"):
        euler_risk_and_gradient(heads.astype(jnp.float32), tokens,
                                mf.TokenRegression(jnp.zeros((1, 4, 2))))


@pytest.mark.parametrize("rank", [None, 2])
def test_chunked_closed_forms(getkey, rank):
    """The memory-linear replacement of the Explicit method's dense closed forms agrees with them."""
    from meanfield_tf._adjoint import adjoint_and_gradient
    from meanfield_tf._euler_adjoint import chunked_adjoint_and_gradient

    tokens = make_tokens(getkey, 2, 7, 3, zero=PADDING)
    heads = make_heads(getkey, 1, 4, 3, rank=rank)
    params = {name: p[0] for name, p in heads.params.items()}
    lam = jax.random.normal(getkey(), tokens.x.shape)
    adj, grads = chunked_adjoint_and_gradient(tokens.x, tokens.w, lam, params, chunk_size=3,
                                              block_rows=5)
    ref_adj, ref_grads = adjoint_and_gradient(tokens.x, tokens.w, lam, params)
    assert rel_err(adj, ref_adj) <= RTOL
    assert set(grads) == set(ref_grads)
    for name in grads:
        assert rel_err(grads[name], ref_grads[name]) <= RTOL
