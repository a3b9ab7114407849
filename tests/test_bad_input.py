"""Bad input at library level: every mistake raises a `MeanFieldError` subclass whose one-line
message names the problem (asserted on a distinctive substring)."""

import diffrax
import numpy as np
import pytest

import meanfield_tf as mf

B, N, D, L, M = 2, 5, 3, 2, 2


def good_x(dtype=np.float64):
    return np.random.default_rng(0).normal(size=(B, N, D)).astype(dtype)


def good_w():
    w = np.random.default_rng(1).uniform(0.5, 1.0, size=(B, N))
    return w / w.sum(axis=1, keepdims=True)


def good_params(dtype=np.float64):
    rng = np.random.default_rng(2)
    return {"A": rng.normal(size=(L, M, D, D)).astype(dtype),
            "V": rng.normal(size=(L, M, D, D)).astype(dtype)}


def raises(exc, match):
    """`pytest.raises` that also checks the message is one line (printable by the CLI as is)."""
    class _Check:
        def __enter__(self):
            self.ctx = pytest.raises(exc, match=match)
            self.info = self.ctx.__enter__()
            return self.info

        def __exit__(self, *args):
            out = self.ctx.__exit__(*args)  # raises unless the expected error was raised
            assert issubclass(self.info.type, mf.MeanFieldError)
            assert "\n" not in str(self.info.value)
            return out

    return _Check()


# ---------------------------------------------------------------------------------------------
# Tokens


@pytest.mark.parametrize("shape", [(N, D), (B, N, D, 1), (D,)])
def test_tokens_not_3d(shape):
    with raises(mf.InputError, r"expected \(B, n, d\)"):
        mf.TokenBatch(np.zeros(shape))


def test_tokens_empty_sequence():
    with raises(mf.InputError, "no tokens"):
        mf.TokenBatch(np.zeros((B, 0, D)))


@pytest.mark.parametrize("shape", [(B, N + 1), (N,), (B, N, 1)])
def test_weights_wrong_shape(shape):
    with raises(mf.InputError, "token weights w has shape"):
        mf.TokenBatch(good_x(), np.full(shape, 1.0 / N))


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_tokens(value):
    x = good_x()
    x[1, 2, 0] = value
    with raises(mf.InputError, r"tokens x contains 1 non-finite value\(s\).*\(1, 2, 0\)"):
        mf.TokenBatch(x, good_w())


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_weights(value):
    w = good_w()
    w[0, 3] = value
    with raises(mf.InputError, "token weights w contains 1 non-finite"):
        mf.TokenBatch(good_x(), w)


def test_negative_weights():
    w = good_w()
    w[1, 0] += w[1, 1] + 0.1
    w[1, 1] = -0.1
    with raises(mf.InputError, r"negative entries \(first at index \(1, 1\)\)"):
        mf.TokenBatch(good_x(), w)


def test_unnormalised_weights():
    with raises(mf.InputError, "rows must sum to 1.*row 0 sums to 5"):
        mf.TokenBatch(good_x(), np.ones((B, N)))


# ---------------------------------------------------------------------------------------------
# Heads


def test_heads_A_V_shape_mismatch():
    p = good_params()
    with raises(mf.InputError, r"heads A has shape \(2, 2, 2, 2\) but V has \(2, 2, 3, 3\)"):
        mf.HeadMeasure(A=p["A"][..., :2, :2], V=p["V"])


@pytest.mark.parametrize("shape", [(L, M, D), (L, M, D, D + 1)])
def test_heads_V_bad_shape(shape):
    with raises(mf.InputError, "heads V has shape"):
        mf.HeadMeasure(A=np.zeros((L, M, D, D)), V=np.zeros(shape))


def test_factored_heads_shape_mismatch():
    q = np.zeros((L, M, 2, D))
    with raises(mf.InputError, "factored heads need Q and K"):
        mf.HeadMeasure(Q=q, K=np.zeros((L, M, 3, D)), V=np.zeros((L, M, D, D)))


def test_heads_need_A_or_QK():
    with raises(mf.InputError, "give A"):
        mf.HeadMeasure(V=np.zeros((L, M, D, D)))
    with raises(mf.InputError, "not both"):
        mf.HeadMeasure(A=np.zeros((L, M, D, D)), Q=np.zeros((L, M, 1, D)),
                       K=np.zeros((L, M, 1, D)), V=np.zeros((L, M, D, D)))


@pytest.mark.parametrize("name", ["A", "V"])
@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_heads(name, value):
    p = good_params()
    p[name][1, 0, 2, 1] = value
    with raises(mf.InputError, rf"heads {name} contains 1 non-finite value\(s\).*\(1, 0, 2, 1\)"):
        mf.HeadMeasure(**p)


def test_unknown_interpolation_and_odd_symmetric_heads(getkey):
    with raises(mf.InputError, "unknown depth interpolation 'cubic'"):
        mf.HeadMeasure(**good_params(), interpolation="cubic")
    with raises(mf.InputError, "even number of heads"):
        mf.symmetric_heads(getkey(), L, 3, D)


# ---------------------------------------------------------------------------------------------
# flow


def test_heads_and_tokens_dimension_mismatch():
    heads = mf.HeadMeasure(**good_params())
    tokens = mf.TokenBatch(good_x()[..., :2], good_w())
    with raises(mf.InputError, "heads act on dimension d=3 but tokens live in d=2"):
        mf.flow(heads, tokens)


def test_heads_and_tokens_dtype_mismatch():
    heads = mf.HeadMeasure(**good_params(np.float32))
    tokens = mf.TokenBatch(good_x(), good_w())
    with raises(mf.InputError, "heads are float32 but tokens are float64"):
        mf.flow(heads, tokens)


@pytest.mark.parametrize("depths,match", [
    ([0.5, 0.25], "sorted"),
    ([-0.1, 0.5], r"in \[0, 1\]"),
    ([0.5, 1.5], r"in \[0, 1\]"),
    ([0.2, np.nan], "sorted"),
    ([[0.0, 1.0]], "1-D array"),
])
def test_bad_depths(depths, match):
    heads = mf.HeadMeasure(**good_params())
    tokens = mf.TokenBatch(good_x(), good_w())
    with raises(mf.InputError, match):
        mf.flow(heads, tokens, depths=np.asarray(depths))


def test_bad_stepping_and_kernel_options():
    with raises(mf.InputError, "steps_per_layer must be >= 1"):
        mf.FixedSteps(0)
    with raises(mf.InputError, "rtol and atol must be > 0"):
        mf.AdaptiveSteps(rtol=0.0)
    with raises(mf.InputError, "rtol and atol must be > 0"):
        mf.AdaptiveSteps(rtol=np.nan)
    with raises(mf.InputError, "chunk_size must be >= 1"):
        mf.ChunkedKernel(0)
    heads = mf.HeadMeasure(**good_params())
    tokens = mf.TokenBatch(good_x(), good_w())
    with raises(mf.InputError, "Euler has no error estimate"):
        mf.flow(heads, tokens, mf.DepthSolver(diffrax.Euler(), mf.AdaptiveSteps()))


def test_gaussian_flow_shape_mismatch():
    heads = mf.HeadMeasure(**good_params())
    with raises(mf.InputError, r"expected \(3,\)/\(3, 3\)"):
        mf.gaussian_flow(heads, np.zeros(2), np.eye(2))
    with raises(mf.InputError, "Gaussian cov contains"):
        mf.gaussian_flow(heads, np.zeros(D), np.full((D, D), np.nan))


def test_adaptive_solve_that_cannot_converge():
    # Strong heads, a tight tolerance and at most 2 steps per layer: the controller cannot reach
    # the end of the first layer. The solve returns (no exception inside jit) with converged=False,
    # and check_converged turns that into a SolverError naming the layer.
    p = good_params()
    heads = mf.HeadMeasure(A=3 * p["A"], V=3 * p["V"])
    tokens = mf.TokenBatch(good_x(), good_w())
    sol = mf.flow(heads, tokens, mf.DepthSolver(
        diffrax.Tsit5(), mf.AdaptiveSteps(rtol=1e-10, atol=1e-12, max_steps_per_layer=2)))
    ok = np.asarray(sol.converged)
    assert ok.shape == (L,) and not ok.all()
    with raises(mf.SolverError, f"failed in layer {int(np.argmin(ok))} of {L}"):
        mf.check_converged(sol)
