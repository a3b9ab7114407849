"""The native CPU attention kernel against independent references, and its build and mode handling.

References: a float64 NumPy evaluation of the row means, log-sum-exps and their cotangents
(explicit max-shifted softmax over the positive-weight keys, one row at a time), and JAX
autodiff of the dense kernel. In float64 the kernel and the references differ only by the order
of their sums, a few roundings per term (~1e-15), so 1e-12 relative is 1000x headroom; a wrong or
missing term is O(1). In float32 the kernel's own `exp` (about 1 ulp) is checked against float64
to 2e-6 relative, a few float32 roundings of the d-term dot products.
"""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import meanfield_tf as mf
from meanfield_tf import _native_attention as native
from meanfield_tf._euler_adjoint import euler_risk_and_gradient

from conftest import rel_err

pytestmark = pytest.mark.skipif(not native.native_kernel_status().available,
                                reason="no C++ compiler: the native kernel cannot be built")


def np_rows(z, x, w, g):
    """Row means, log-sum-exps and the cotangents (dz, dx, dlw) for row-mean cotangents g."""
    keep = w > 0
    lw = np.where(keep, np.log(np.where(keep, w, 1.0)), -np.inf)
    y, lse = np.zeros_like(z), np.zeros(z.shape[0])
    dz, dx, dlw = np.zeros_like(z), np.zeros_like(x), np.zeros(x.shape[0])
    for i in range(z.shape[0]):
        s = x @ z[i] + lw
        mx = s[keep].max()
        p = np.where(keep, np.exp(s - mx), 0.0)
        lse[i] = mx + np.log(p.sum())
        p /= p.sum()
        y[i] = p @ x
        ds = p * (x @ g[i] - g[i] @ y[i])
        dz[i] = ds @ x
        dx += np.outer(p, g[i]) + np.outer(ds, z[i])
        dlw += ds
    return y, lse, dz, dx, dlw


def _data(rng, R, n, d, pad=True):
    z = 0.7 * rng.standard_normal((R, d))
    x = rng.standard_normal((n, d))
    w = rng.random(n) + 0.1
    if pad:
        w[::3] = 0.0  # padding keys: weight 0, log-weight -inf
    w /= w.sum()
    g = rng.standard_normal((R, d))
    return z, x, w, g


def _log_w(w):
    return jnp.where(w > 0, jnp.log(jnp.where(w > 0, w, 1.0)), -jnp.inf)


# d = 16 and 2 are compiled specialisations; 1, 3, 17 and 64 the run-time-d path; n = 1, 13,
# 70 and 129 are not multiples of the 64-key padding; n = 700 and 600 take the key-chunked
# passes (more than 32 blocks of 8 float64 keys, the last chunk partial), with 37 rows: two full
# tiles of 16 rows and a partial one
@pytest.mark.parametrize("R,n,d", [(5, 1, 1), (37, 13, 3), (64, 70, 16), (9, 129, 17),
                                   (20, 40, 2), (6, 33, 64), (37, 700, 16), (37, 600, 3)])
def test_rows_match_numpy_float64(R, n, d):
    rng = np.random.default_rng(R * 1000 + n * 10 + d)
    z, x, w, g = _data(rng, R, n, d, pad=n > 1)
    y_ref, lse_ref, dz_ref, dx_ref, dlw_ref = np_rows(z, x, w, g)
    y, lse = native.native_rows_forward(jnp.asarray(z), jnp.asarray(x), _log_w(jnp.asarray(w)))
    D = jnp.sum(jnp.asarray(g) * y, axis=-1)
    dz, dx, dlw = native.native_rows_backward(jnp.asarray(z), jnp.asarray(x),
                                              _log_w(jnp.asarray(w)), lse, jnp.asarray(g), D)
    assert y.dtype == jnp.float64
    assert rel_err(y, y_ref) < 1e-12 and rel_err(lse, lse_ref) < 1e-12
    assert rel_err(dz, dz_ref) < 1e-12 and rel_err(dx, dx_ref) < 1e-12
    assert rel_err(dlw, dlw_ref) < 1e-12


def test_leading_batch_axes_and_vmap():
    """Leading axes are one batch (rows of sequence b see only the keys of sequence b); vmap
    over the kernel is the same call with one more leading axis."""
    rng = np.random.default_rng(3)
    B1, B2, R, n, d = 2, 3, 11, 17, 4
    z = rng.standard_normal((B1, B2, R, d))
    x = rng.standard_normal((B1, B2, n, d))
    w = rng.random((B1, B2, n)) + 0.05
    w /= w.sum(-1, keepdims=True)
    y, lse = native.native_rows_forward(jnp.asarray(z), jnp.asarray(x), jnp.log(jnp.asarray(w)))
    yv, lv = jax.vmap(native.native_rows_forward)(jnp.asarray(z), jnp.asarray(x),
                                                  jnp.log(jnp.asarray(w)))
    for a in range(B1):
        for b in range(B2):
            y_ref, lse_ref, *_ = np_rows(z[a, b], x[a, b], w[a, b], z[a, b])
            assert rel_err(y[a, b], y_ref) < 1e-12 and rel_err(lse[a, b], lse_ref) < 1e-12
    np.testing.assert_array_equal(np.asarray(yv), np.asarray(y))
    np.testing.assert_array_equal(np.asarray(lv), np.asarray(lse))


def test_float32_exp_accuracy_over_the_score_range():
    """Scores spread over ±60 (softmax weights from 1 down to e^-120, below float32's range):
    the float32 kernel agrees with float64 NumPy to float32 rounding, and never returns NaN."""
    rng = np.random.default_rng(5)
    R, n, d = 40, 300, 8
    z = rng.standard_normal((R, d)) * 3.0
    x = rng.standard_normal((n, d)) * 3.0
    w = np.full(n, 1.0 / n)
    y_ref, lse_ref, *_ = np_rows(z, x, w, z)
    y, lse = native.native_rows_forward(jnp.asarray(z, jnp.float32), jnp.asarray(x, jnp.float32),
                                        jnp.log(jnp.asarray(w, jnp.float32)))
    assert y.dtype == jnp.float32
    assert np.isfinite(np.asarray(y)).all()
    assert rel_err(y, y_ref) < 2e-6
    assert np.abs(np.asarray(lse) - lse_ref).max() / np.abs(lse_ref).max() < 2e-6


def test_native_flash_attention_matches_dense_autodiff():
    """The chunked kernel's custom VJP on the native rows = autodiff of the dense kernel."""
    rng = np.random.default_rng(11)
    n, d, M = 23, 3, 4
    x = jnp.asarray(rng.standard_normal((n, d)))
    w = jnp.asarray(np.r_[rng.random(n - 4) + 0.1, np.zeros(4)])
    w = w / w.sum()
    A = jnp.asarray(rng.standard_normal((M, d, d)) * 0.5)
    V = jnp.asarray(rng.standard_normal((M, d, d)))
    ct = jnp.asarray(rng.standard_normal((n, d)))

    def loss(kernel):
        return lambda x, A, V: jnp.sum(ct * kernel(x, w, A, V))

    got = jax.grad(loss(mf.ChunkedKernel(7)), argnums=(0, 1, 2))(x, A, V)
    ref = jax.grad(loss(mf.DenseKernel()), argnums=(0, 1, 2))(x, A, V)
    for a, b in zip(got, ref):
        assert rel_err(a, b) < 1e-12


@pytest.fixture
def xla_only():
    previous = native.set_native_kernels("off")
    yield
    native.set_native_kernels(previous)


def test_fused_gradient_native_equals_xla_path(getkey, request):
    """The fused Euler gradient through the native rows equals the one through XLA's blocks."""
    heads = mf.gaussian_heads(getkey(), 3, 5, 3, mean_V=0.7)
    x = jax.random.normal(getkey(), (4, 19, 3))
    w = jnp.ones((4, 19)).at[:, -3:].set(0.0)
    tokens = mf.TokenBatch(x, w / w.sum(-1, keepdims=True))
    risk = mf.TokenRegression(jax.random.normal(getkey(), (4, 19, 3)))

    def run():
        return euler_risk_and_gradient(heads, tokens, risk, steps_per_layer=2, chunk_size=8,
                                       wrt_tokens=True)

    assert native.native_usable(jnp.float64, 3)
    native_out = run()
    request.getfixturevalue("xla_only")
    assert not native.native_usable(jnp.float64, 3)
    xla_out = run()
    assert rel_err(native_out[0], xla_out[0]) < 1e-13
    assert set(native_out[1]) == set(xla_out[1])
    for k in native_out[1]:
        assert rel_err(native_out[1][k], xla_out[1][k]) < 1e-12
    assert rel_err(native_out[2], xla_out[2]) < 1e-12


def test_mode_validation():
    with pytest.raises(mf.InputError, match="one of auto, on, off"):
        mf.set_native_kernels("fast")
    assert mf.native_kernel_status().mode in native.MODES


def _run_python(code, env_extra, timeout=600):
    env = {**os.environ, **env_extra}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, env=env, timeout=timeout)


FALLBACK = """
    import warnings, numpy as np, jax, jax.numpy as jnp
    import meanfield_tf as mf
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        heads = mf.gaussian_heads(jax.random.PRNGKey(0), 2, 3, 2)
        x = jax.random.normal(jax.random.PRNGKey(1), (2, 9, 2))
        out = mf.euler_flow(heads, x, jnp.full((2, 9), 1 / 9))
    s = mf.native_kernel_status()
    print("STATUS", s.mode, s.available, bool(np.isfinite(np.asarray(out)).all()), len(caught))
    print("REASON", s.reason)
"""


def test_no_compiler_falls_back_silently_or_refuses(tmp_path):
    """Without a compiler, "auto" runs the XLA path (no warning); "on" refuses, naming why."""
    env = {"CXX": "no-such-compiler-xyz", "MEANFIELD_TF_CACHE_DIR": str(tmp_path)}
    auto = _run_python(FALLBACK, {**env, "MEANFIELD_TF_NATIVE": "auto"})
    assert auto.returncode == 0, auto.stderr
    assert "STATUS auto False True 0" in auto.stdout
    assert "no C++ compiler found" in auto.stdout
    on = _run_python(FALLBACK, {**env, "MEANFIELD_TF_NATIVE": "on"})
    assert on.returncode != 0
    assert "native CPU attention kernel was requested" in on.stderr
    assert "no-such-compiler-xyz" in on.stderr
    bad = _run_python(FALLBACK, {"MEANFIELD_TF_NATIVE": "sometimes"})
    assert bad.returncode != 0 and "MEANFIELD_TF_NATIVE must be one of" in bad.stderr


def test_failing_compiler_warns_and_falls_back(tmp_path):
    """A compiler that fails is worth a warning in "auto" mode, and the results still come."""
    fake = tmp_path / "bad-cxx"
    fake.write_text("#!/bin/sh\n[ \"$1\" = --version ] && { echo fake 1.0; exit 0; }\n"
                    "echo 'error: simulated failure' >&2; exit 1\n")
    fake.chmod(0o755)
    env = {"CXX": str(fake), "MEANFIELD_TF_CACHE_DIR": str(tmp_path / "cache"),
           "MEANFIELD_TF_NATIVE": "auto"}
    out = _run_python(FALLBACK, env)
    assert out.returncode == 0, out.stderr
    assert "STATUS auto False True 1" in out.stdout
    assert "simulated failure" in out.stdout


BUILD = """
    from meanfield_tf import _native_attention as native
    print("LIB", native.build_library())
"""


def test_concurrent_builds_share_one_complete_library(tmp_path):
    """Two processes building into one empty cache at once: both get the same, loadable file,
    and no temporary file is left behind."""
    env = {"MEANFIELD_TF_CACHE_DIR": str(tmp_path)}
    procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(BUILD)], env={**os.environ, **env},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e for _, e in outs]
    libs = {line.split()[1] for out, _ in outs for line in out.splitlines() if line.startswith("LIB")}
    assert len(libs) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [os.path.basename(libs.pop())]
    check = _run_python("""
        import ctypes, glob, os
        lib = ctypes.cdll.LoadLibrary(glob.glob(os.environ["MEANFIELD_TF_CACHE_DIR"] + "/*.so")[0])
        print(all(hasattr(lib, n) for n in ("mft_flash_forward_f32", "mft_flash_backward_f64")))
    """, env)
    assert check.stdout.strip() == "True", check.stderr


CONCURRENT = """
    import jax, jax.numpy as jnp, numpy as np
    from meanfield_tf import _native_attention as native
    assert native.native_kernel_status().available  # builds and registers the kernel
    assert jax.device_count() == 4
    rng = np.random.default_rng(0)
    B, n, d, M = 4, 200, 16, 16
    x = jnp.asarray(rng.standard_normal((B, n, d)), jnp.float32)
    lw = jnp.full((B, n), -np.log(n), jnp.float32)
    A = jnp.asarray(rng.standard_normal((M, d, d)) / 4, jnp.float32)

    # one sequence per device: four kernel calls in flight at once on the host's one pool
    step = jax.pmap(lambda x, lw: native.native_step_forward(x[None], lw[None], A, A)[0][0])
    for _ in range(20):
        out = jax.block_until_ready(step(x, lw))
    ref = native.native_step_forward(x, lw, A, A)[0]
    print("DONE", bool(jnp.allclose(out, ref, rtol=1e-6, atol=1e-6)))
"""


def test_concurrent_calls_on_four_devices():
    """Kernel calls of four CPU devices in flight at once, sharing the host's intra-op pool,
    finish and agree with one batched call."""
    out = _run_python(CONCURRENT, {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"},
                      timeout=180)  # a deadlock raises TimeoutExpired
    assert out.returncode == 0, out.stderr
    assert "DONE True" in out.stdout


def test_exp_rate_kernel_matches_numpy():
    """The exp used to measure the roofline is the kernels' exp: exp(-|x|) repeated, to float32
    rounding (its arguments sweep [-20, 0] and the tail that is not a whole vector)."""
    x = np.linspace(-20.0, 20.0, 16 * 97 + 5).astype(np.float32)
    ref = x.astype(np.float64)
    for _ in range(3):
        ref = np.exp(-np.abs(ref))
    got = np.asarray(native.native_exp_neg_abs(jnp.asarray(x), 3))
    assert np.abs(got - ref).max() <= 4 * np.finfo(np.float32).eps * np.abs(ref).max()
    one = np.asarray(native.native_exp_neg_abs(jnp.asarray(x), 1))
    assert rel_err(one, np.exp(-np.abs(x.astype(np.float64)))) < 3e-7
