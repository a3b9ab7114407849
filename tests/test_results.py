"""A run read back and exported: `meanfield_tf.load_run` and `meanfield-tf export`."""

import subprocess
import sys

import numpy as np
import pytest

from meanfield_tf.cli import main

TINY = ["dtype=float64", "heads.layers=2", "heads.heads=6", "task.tokens.n=5", "train.steps=6",
        "train.log_every=1", "train.eval_every=3", "train.checkpoint_every=3",
        "train.keep_checkpoints=5", "train.w2_every=2"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "ts"
    assert main(["train", "--quiet", "--out", str(out), *TINY]) == 0
    return out


def test_load_run_is_lazy_and_public(run_dir):
    code = ("import sys, meanfield_tf as mf; assert 'yaml' not in sys.modules; "
            f"r = mf.load_run({str(run_dir)!r}); assert 'yaml' in sys.modules; print(r.steps)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[0, 3, 6]"


def test_load_run_config_metrics_heads(run_dir):
    import meanfield_tf as mf

    r = mf.load_run(run_dir)
    assert r.config.train.steps == 6 and r.config.heads.heads == 6
    np.testing.assert_array_equal(r.train["step"], np.arange(6))
    assert r.train["loss"].shape == (6,) and np.isfinite(r.train["loss"]).all()
    np.testing.assert_array_equal(r.eval["step"], [0, 3, 6])
    assert r.eval["w2_layers"].shape == (3, 2)
    assert r.eval["w2"][0] < 1e-12 and r.eval["w2"][-1] > 0
    h0, h3, h6 = r.heads(0), r.heads(3), r.heads()
    assert not np.allclose(h0.params["A"], h6.params["A"])
    # the W2 logged at step 6 is the distance of the checkpoint's heads from the initial ones
    w2, _ = mf.conditional_w2(h6, h0)
    np.testing.assert_allclose(float(w2), r.eval["w2"][-1], rtol=1e-9)
    assert not np.allclose(h3.params["A"], h6.params["A"])
    # the frequent W2,c rows: between evaluations, at τ after those steps
    np.testing.assert_array_equal(r.w2["step"], [2, 4])
    np.testing.assert_allclose(r.w2["time"], r.train["time"][[2, 4]], rtol=1e-12)
    assert np.all(np.diff(r.w2["w2"]) > 0) and r.w2["w2"][0] > 0
    with pytest.raises(mf.InputError, match="available steps: 0, 3, 6"):
        r.heads(4)


def test_export_then_simulate_equals_the_runs_forward(run_dir, tmp_path, capsys):
    import meanfield_tf as mf

    heads_npz = tmp_path / "heads.npz"
    assert main(["export", str(run_dir), "--step", "3", "--out", str(heads_npz)]) == 0
    said = capsys.readouterr().out
    assert "step 3" in said and "--dtype float64" in said
    with np.load(heads_npz) as f:
        assert str(f["interpolation"]) == "piecewise" and int(f["step"]) == 3
        flags = str(f["solver_flags"]).split()
    x = np.random.default_rng(0).normal(size=(3, 7, 2))
    np.savez(tmp_path / "t.npz", x=x)
    out = tmp_path / "sim.npz"
    assert main(["simulate", "--tokens", str(tmp_path / "t.npz"), "--heads", str(heads_npz),
                 *flags, "--out", str(out)]) == 0
    r = mf.load_run(run_dir)
    expected = r.run.forward(r.heads(3), mf.TokenBatch(x))
    with np.load(out) as f:
        np.testing.assert_allclose(f["x"], np.asarray(expected), rtol=0, atol=1e-12)
    # a second simulate to the same file is refused without --force
    capsys.readouterr()
    assert main(["simulate", "--tokens", str(tmp_path / "t.npz"), "--heads", str(heads_npz),
                 *flags, "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    # a flag contradicting the recorded interpolation is refused
    assert main(["simulate", "--tokens", str(tmp_path / "t.npz"), "--heads", str(heads_npz),
                 "--interpolation", "linear", "--out", str(tmp_path / "o2.npz")]) == 2
    assert "records interpolation 'piecewise'" in capsys.readouterr().err


def test_eval_and_summary_say_what_they_measure(run_dir, capsys):
    assert main(["eval", str(run_dir)]) == 0
    said = capsys.readouterr().out
    assert "checkpoint of step 6" in said and "on the full training set" in said
    from meanfield_tf.workflow.evaluation import summarize
    from meanfield_tf.workflow.rundir import RunDir

    s = summarize(RunDir(run_dir))
    r = __import__("meanfield_tf").load_run(run_dir)
    # the smoothed loss is the mean over the last 10% of logged rows (at least one)
    assert s["smoothed_loss"] == pytest.approx(r.train["loss"][-1], rel=1e-12)
    assert s["wall_s"] > 0


def test_tolerance_below_the_dtype_resolution_warns():
    from meanfield_tf.workflow.build import warn_tolerances
    from meanfield_tf.workflow.config import SolverConfig

    with pytest.warns(UserWarning, match=r"rtol=1e-09 is below the resolution of float32"):
        warn_tolerances(SolverConfig(name="tsit5", rtol=1e-9, atol=1e-6), "float32")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_tolerances(SolverConfig(name="tsit5", rtol=1e-9, atol=1e-9), "float64")
