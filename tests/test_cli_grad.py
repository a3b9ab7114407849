"""`meanfield-tf grad`: the file contract, agreement with the library, one-line errors."""

import subprocess
import sys

import jax
import numpy as np
import pytest

import meanfield_tf as mf
from conftest import rel_err
from meanfield_tf.cli import main


@pytest.fixture
def files(tmp_path, getkey):
    B, n, d, L, M = 2, 4, 2, 3, 2
    x = np.asarray(jax.random.normal(getkey(), (B, n, d)))
    w = np.asarray(jax.random.uniform(getkey(), (B, n), minval=0.2, maxval=1.0))
    w = w / w.sum(1, keepdims=True)
    heads = mf.gaussian_heads(getkey(), L, M, d)
    y = np.asarray(jax.random.normal(getkey(), (B, n, d)))
    paths = {k: tmp_path / f"{k}.npz" for k in ("tokens", "heads", "targets")}
    np.savez(paths["tokens"], x=x, w=w)
    np.savez(paths["heads"], A=np.asarray(heads.A), V=np.asarray(heads.V))
    np.savez(paths["targets"], y=y)
    return paths, (x, w, heads, y)


def _args(paths, out, *extra):
    return ["grad", "--tokens", str(paths["tokens"]), "--heads", str(paths["heads"]),
            "--targets", str(paths["targets"]), "--out", str(out), "--dtype", "float64", *extra]


@pytest.mark.parametrize("method", ["autodiff", "explicit"])
def test_grad_matches_library(files, tmp_path, method, capsys):
    paths, (x, w, heads, y) = files
    out = tmp_path / "g.npz"
    assert main(_args(paths, out, "--method", method)) == 0
    assert "wrote" in capsys.readouterr().out
    got = np.load(out)
    assert set(got.files) == {"loss", "A", "V"} and got["loss"].shape == ()
    loss, grads = mf.risk_and_gradient(heads, mf.TokenBatch(x, w), mf.TokenRegression(y))
    assert abs(float(got["loss"]) - float(loss)) <= 1e-14 * float(loss)
    for k in ("A", "V"):
        assert got[k].shape == heads.params[k].shape
        assert rel_err(got[k], grads.params[k]) < 1e-12


def test_grad_backsolve_adaptive(files, tmp_path):
    paths, (x, w, heads, y) = files
    out = tmp_path / "g.npz"
    assert main(_args(paths, out, "--method", "backsolve", "--solver", "tsit5",
                      "--rtol", "1e-10", "--atol", "1e-10")) == 0
    got = np.load(out)
    _, ref = mf.risk_and_gradient(heads, mf.TokenBatch(x, w), mf.TokenRegression(y),
                                  solver=mf.DepthSolver(mf.ClassicalRK4(), mf.FixedSteps(16)))
    assert rel_err(got["V"], ref.V) < 1e-6


def _error_line(capsys):
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    return err


def test_grad_bad_inputs(files, tmp_path, capsys):
    paths, (x, w, heads, y) = files
    out = tmp_path / "g.npz"
    np.savez(tmp_path / "bad_shape.npz", y=y[:, :-1])
    np.savez(tmp_path / "bad_value.npz", y=np.where(np.arange(y.size).reshape(y.shape) == 3,
                                                    np.nan, y))
    np.savez(tmp_path / "no_key.npz", z=y)
    cases = {
        "bad_shape": "expected (2, 4, 2)",
        "bad_value": "non-finite",
        "no_key": "lacks key",
    }
    for name, msg in cases.items():
        p = dict(paths, targets=tmp_path / f"{name}.npz")
        assert main(_args(p, out)) == 2
        assert msg in _error_line(capsys), name
    assert main(_args(paths, out, "--method", "backsolve")) == 2
    assert "Backsolve with constant-step Euler" in _error_line(capsys)
    assert main(_args(paths, out, "--steps", "4")) == 2
    assert "multiple of the number of layers" in _error_line(capsys)
    assert not out.exists()


def test_grad_subprocess_exit_code(files, tmp_path):
    paths, _ = files
    p = dict(paths, targets=tmp_path / "missing.npz")
    res = subprocess.run([sys.executable, "-m", "meanfield_tf", *_args(p, tmp_path / "g.npz")],
                         capture_output=True, text=True)
    assert res.returncode == 2
    assert res.stderr.count("\n") == 1 and "does not exist" in res.stderr
