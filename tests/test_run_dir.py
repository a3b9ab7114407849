"""Run directories: resolved config, manifest, metrics, atomic checkpoints, resume, divergence."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import yaml

from meanfield_tf import TrainingDiverged
from meanfield_tf.workflow.build import run as build_run
from meanfield_tf.workflow.config import load_train_config
from meanfield_tf.workflow.evaluation import evaluate_run
from meanfield_tf.workflow.rundir import RunDir
from meanfield_tf.workflow.training import train

# A tiny float64 teacher–student run: L = 2 layers of M = 8 heads, 4 sequences of 6 tokens.
TINY = ["dtype=float64", "heads.layers=2", "heads.heads=8", "task.tokens.n=6",
        "train.learning_rate=2.0", "train.log_every=1", "train.eval_every=10",
        "train.checkpoint_every=10", "train.keep_checkpoints=2"]


def _params(state):
    return {k: np.asarray(v) for k, v in state.heads.params.items()}


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """30 uninterrupted steps."""
    out = tmp_path_factory.mktemp("runs") / "full"
    cfg = load_train_config(None, TINY + ["train.steps=30"])
    summary = train(cfg, out, progress=False)
    return out, cfg, summary


def test_run_directory_contents(full_run):
    out, cfg, summary = full_run
    rd = RunDir(out)
    # resolved config reads back to the same config
    assert rd.read_config() == cfg
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["steps"] == 30
    man = json.loads((out / "manifest.json").read_text())
    assert man["seed"] == cfg.seed and man["versions"]["jax"] == jax.__version__
    assert man["devices"] and "git_commit" in man
    rows = rd.read_metrics()
    train_rows = [r for r in rows if r["kind"] == "train"]
    eval_rows = [r for r in rows if r["kind"] == "eval"]
    assert [r["step"] for r in train_rows] == list(range(30))
    assert [r["step"] for r in eval_rows] == [0, 10, 20, 30]
    for r in train_rows:
        assert {"loss", "grad_norm", "time", "lr", "wall_s"} <= set(r)
        assert r["time"] == pytest.approx(2.0 * r["step"])
    assert eval_rows[0]["w2"] == pytest.approx(0.0, abs=1e-20)
    w2 = [r["w2"] for r in eval_rows]
    assert all(b > a for a, b in zip(w2, w2[1:]))  # the heads move away from their start
    assert len(eval_rows[-1]["w2_layers"]) == 2
    # keep-last-2 checkpoints, no temporary files left
    assert [s for s, _ in rd.checkpoints()] == [20, 30]
    assert not [p for p in rd.checkpoint_dir.iterdir() if p.name.startswith(".")]
    for name in ("loss.png", "particles.png", "tokens_initial.png", "tokens_trained.png"):
        assert (out / "figures" / name).stat().st_size > 1000
    assert summary["traces"] <= 1  # 0 when an earlier test compiled the same step
    assert summary["loss"] < summary["first_loss"]


def test_checkpoint_roundtrip_is_exact(full_run):
    out, cfg, _ = full_run
    rd = RunDir(out)
    run = build_run(cfg)
    state = rd.load_checkpoint(run.initial_state())
    assert int(state.step) == 30
    again = rd.load_checkpoint(run.initial_state())
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(again)):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    ev = evaluate_run(out)
    assert ev["step"] == 30 and np.isfinite(ev["train_loss"]) and (out / "eval.json").exists()
    # the evaluation reproduces the logged W2 of the last checkpoint
    last_eval = [r for r in rd.read_metrics() if r["kind"] == "eval"][-1]
    assert ev["w2"] == pytest.approx(last_eval["w2"], rel=1e-12)


def test_resume_extends_run_bit_identically(full_run, tmp_path):
    out_full, _, _ = full_run
    out = tmp_path / "short"
    train(load_train_config(None, TINY + ["train.steps=20"]), out, progress=False)
    # a line cut by a kill and rows past the checkpoint are dropped on resume
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "step": 20, "loss": 1.0}\n{"kind": "tr')
    cfg = load_train_config(None, TINY + ["train.steps=30"])
    train(cfg, out, resume=True, progress=False)
    a = RunDir(out).load_checkpoint(build_run(cfg).initial_state())
    b = RunDir(out_full).load_checkpoint(build_run(cfg).initial_state())
    for k, v in _params(a).items():
        assert np.array_equal(v, _params(b)[k]), k
    rows = RunDir(out).read_metrics()
    assert [r["step"] for r in rows if r["kind"] == "train"] == list(range(30))
    full_losses = [r["loss"] for r in RunDir(out_full).read_metrics() if r["kind"] == "train"]
    assert [r["loss"] for r in rows if r["kind"] == "train"] == full_losses


def test_refuses_to_overwrite_a_run(full_run):
    from meanfield_tf import MeanFieldError

    out, cfg, _ = full_run
    with pytest.raises(MeanFieldError, match="already holds a run"):
        train(cfg, out, progress=False)


def test_divergence_stops_and_keeps_last_good_checkpoint(full_run, tmp_path):
    out = tmp_path / "div"
    train(load_train_config(None, TINY + ["train.steps=10"]), out, progress=False)
    rd = RunDir(out)
    (step, ckpt), = rd.checkpoints()
    before = ckpt.read_bytes()
    cfg = load_train_config(None, TINY + ["train.steps=30", "train.learning_rate=1e8"])
    with pytest.raises(TrainingDiverged, match="last good checkpoint \\(step 10\\)"):
        train(cfg, out, resume=True, progress=False)
    assert [s for s, _ in rd.checkpoints()] == [10]
    assert ckpt.read_bytes() == before


@pytest.mark.slow
def test_sigkill_then_resume_is_bit_identical(full_run, tmp_path):
    """A run killed with SIGKILL mid-training and resumed ends with the same parameters (bit for
    bit, CPU) as the uninterrupted run of the same length."""
    out_full, cfg, _ = full_run
    out = tmp_path / "killed"
    args = [sys.executable, "-m", "meanfield_tf", "train", "--quiet", "--out", str(out),
            *TINY, "train.steps=30", "train.checkpoint_every=1", "train.keep_checkpoints=3"]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    rd = RunDir(out)
    deadline = time.time() + 300
    killed_at = None
    while time.time() < deadline and proc.poll() is None:
        ck = rd.checkpoints()
        if ck and ck[-1][0] >= 5:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            killed_at = rd.checkpoints()[-1][0]
            break
        time.sleep(0.005)
    assert killed_at is not None, "the run ended before it could be killed"
    if killed_at >= 30:
        pytest.skip("the run finished before the kill landed")
    train(rd.read_config(), out, resume=True, progress=False)
    run = build_run(cfg)
    a = rd.load_checkpoint(run.initial_state())
    b = RunDir(out_full).load_checkpoint(run.initial_state())
    assert int(a.step) == int(b.step) == 30
    for k, v in _params(a).items():
        assert np.array_equal(v, _params(b)[k]), k
    for x, y in zip(jax.tree.leaves(a.opt_state), jax.tree.leaves(b.opt_state)):
        assert np.array_equal(np.asarray(x), np.asarray(y))


def test_training_time_column_survives_a_learning_rate_change(tmp_path):
    """`time` is τ = Σ_j lr_j: continuous across a resume that changes the step size."""
    out = tmp_path / "tau"
    train(load_train_config(None, TINY + ["train.steps=10"]), out, progress=False)
    train(load_train_config(None, TINY + ["train.steps=16", "train.learning_rate=0.5"]), out,
          resume=True, progress=False)
    rows = [r for r in RunDir(out).read_metrics() if r["kind"] == "train"]
    taus = {r["step"]: r["time"] for r in rows}
    for k in range(16):
        expect = 2.0 * k if k <= 10 else 2.0 * 10 + 0.5 * (k - 10)
        assert abs(taus[k] - expect) < 1e-12, (k, taus[k], expect)
    assert [r["lr"] for r in rows] == [2.0] * 10 + [0.5] * 6


def test_lr_column_is_the_scheduled_step_and_time_its_sum(tmp_path):
    """Under a cosine schedule `lr` is the step actually taken (base rate x schedule factor),
    `learning_rate` the base rate, and `time` the sum of the steps taken before the row."""
    import optax

    out = tmp_path / "cos"
    cfg = load_train_config(None, TINY + ["train.steps=12", "train.schedule=cosine"])
    train(cfg, out, progress=False, figures=False)
    rows = [r for r in RunDir(out).read_metrics() if r["kind"] == "train"]
    shape = optax.cosine_decay_schedule(1.0, 12)
    want = [2.0 * float(shape(k)) for k in range(12)]
    assert [r["lr"] for r in rows] == pytest.approx(want, rel=1e-6)
    assert all(r["learning_rate"] == 2.0 for r in rows)
    assert [r["time"] for r in rows] == pytest.approx(list(np.cumsum([0.0] + want[:-1])), rel=1e-6)
    assert rows[-1]["lr"] < 0.1 * rows[0]["lr"]
