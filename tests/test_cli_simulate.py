"""`meanfield-tf simulate`: the file contract, the config path, and one-line errors on bad input."""

import subprocess
import sys

import numpy as np
import pytest

from meanfield_tf.cli import main


def _write_problem(tmp_path, B=2, n=5, d=3, L=2, M=4, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(B, n, d))
    w = rng.uniform(0.5, 1.5, size=(B, n))
    w[:, -1] = 0.0  # padding
    w /= w.sum(1, keepdims=True)
    A = rng.normal(size=(L, M, d, d)) / np.sqrt(d)
    V = rng.normal(size=(L, M, d, d)) / np.sqrt(d)
    np.savez(tmp_path / "t.npz", x=x, w=w)
    np.savez(tmp_path / "h.npz", A=A, V=V)
    return x, w, A, V


def _numpy_transformer(x, w, A, V):
    """The finite transformer, written independently with NumPy loops over layers and heads."""
    L, M = A.shape[:2]
    x = x.copy()
    for l in range(L):
        v = np.zeros_like(x)
        for b in range(x.shape[0]):
            for m in range(M):
                s = x[b] @ A[l, m] @ x[b].T
                s = s + np.log(np.where(w[b] > 0, w[b], 1.0)) + np.where(w[b] > 0, 0, -np.inf)
                p = np.exp(s - s.max(1, keepdims=True))
                p /= p.sum(1, keepdims=True)
                v[b] += (p @ x[b]) @ V[l, m].T / M
        x = x + v / L
    return x


def test_simulate_npz_contract_matches_numpy(tmp_path):
    x, w, A, V = _write_problem(tmp_path)
    out = tmp_path / "o.npz"
    rc = main(["simulate", "--tokens", str(tmp_path / "t.npz"), "--heads", str(tmp_path / "h.npz"),
               "--dtype", "float64", "--out", str(out)])
    assert rc == 0
    res = np.load(out)
    assert set(res.files) == {"x", "s", "xs"}
    assert res["x"].shape == x.shape and res["xs"].shape == (3,) + x.shape
    np.testing.assert_allclose(res["s"], [0, 0.5, 1])
    ref = _numpy_transformer(x, w, A, V)
    assert np.abs(res["x"] - ref).max() <= 1e-12 * np.abs(ref).max()
    np.testing.assert_array_equal(res["xs"][0], x)


def test_simulate_config_solvers_and_plot(tmp_path):
    out, png = tmp_path / "o.npz", tmp_path / "traj.png"
    rc = main(["simulate", "--config", "configs/simulate_families.yaml", "--solver", "rk4",
               "--steps", "32", "--num-saves", "5", "--out", str(out), "--plot", str(png)])
    assert rc == 0
    res = np.load(out)
    assert res["xs"].shape[0] == 5 and np.isfinite(res["xs"]).all()
    assert png.stat().st_size > 10_000


def _err(capsys, argv):
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    return rc, err


@pytest.mark.parametrize(
    "mutate, needle",
    [
        (lambda d: d.update(x=d["x"][0]), "expected (B, n, d)"),
        (lambda d: d.update(w=d["w"][:, :-1]), "token weights w has shape"),
        (lambda d: d["x"].__setitem__((0, 0, 0), np.nan), "non-finite"),
        (lambda d: d["w"].__setitem__((0, 0), -0.1), "negative"),
        (lambda d: d.update(w=d["w"] * 2), "sum to 1"),
        (lambda d: d.pop("x"), "lacks key(s) ['x']"),
    ],
)
def test_simulate_bad_tokens_one_line_error(tmp_path, capsys, mutate, needle):
    x, w, A, V = _write_problem(tmp_path)
    data = {"x": x, "w": w}
    mutate(data)
    np.savez(tmp_path / "bad.npz", **data)
    rc, err = _err(capsys, ["simulate", "--tokens", str(tmp_path / "bad.npz"), "--heads",
                            str(tmp_path / "h.npz"), "--out", str(tmp_path / "o.npz")])
    assert rc != 0
    assert needle in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "o.npz").exists()


@pytest.mark.parametrize(
    "mutate, needle",
    [
        (lambda d: d.update(A=d["A"][:, :, :2]), "A and V must both be"),
        (lambda d: d.pop("V"), "lacks key(s) ['V']"),
        (lambda d: d["V"].__setitem__((0, 0, 0, 0), np.inf), "non-finite"),
        (lambda d: d.update(A=np.zeros((2, 4, 2, 2)), V=np.zeros((2, 4, 2, 2))), "dimension d=2"),
    ],
)
def test_simulate_bad_heads_one_line_error(tmp_path, capsys, mutate, needle):
    x, w, A, V = _write_problem(tmp_path)
    data = {"A": A, "V": V}
    mutate(data)
    np.savez(tmp_path / "bad.npz", **data)
    rc, err = _err(capsys, ["simulate", "--tokens", str(tmp_path / "t.npz"), "--heads",
                            str(tmp_path / "bad.npz"), "--out", str(tmp_path / "o.npz")])
    assert rc != 0
    assert needle in err and len(err.splitlines()) == 1, err


@pytest.mark.parametrize(
    "yaml_text, needle",
    [
        ("heads: {layerz: 3}\n", "unknown key 'heads.layerz'"),
        ("heads: {layers: three}\n", "heads.layers must be an integer"),
        ("tokens: {families: [{family: gauss}]}\n", "family 'gauss' is unknown"),
        ("tokens: {families: [{family: box, low: [0, 0], high: [1, 1], size: 2}]}\n", "unknown key"),
        ("solver: {steps: 3}\nheads: {layers: 2}\n", "not a positive multiple"),
        ("dtype: float16\n", "dtype must be float32 or float64"),
    ],
)
def test_simulate_bad_config_one_line_error(tmp_path, capsys, yaml_text, needle):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml_text)
    rc, err = _err(capsys, ["simulate", "--config", str(cfg), "--out", str(tmp_path / "o.npz")])
    assert rc == 2
    assert needle in err and len(err.splitlines()) == 1, err


def test_entry_point_prints_no_traceback(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("heads: {layerz: 3}\n")
    proc = subprocess.run([sys.executable, "-m", "meanfield_tf", "simulate", "--config", str(cfg)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "unknown key 'heads.layerz'" in proc.stderr


def test_help_lists_commands():
    proc = subprocess.run([sys.executable, "-m", "meanfield_tf", "--help"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and "simulate" in proc.stdout
