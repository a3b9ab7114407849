"""Runs that cannot be corrupted, mixed or silently changed; bad input as one-line errors.

Each test checks the exit code (2), that the message is one line naming the problem and the fix,
and that nothing on disk changed where nothing should have.
"""

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

import meanfield_tf as mf
from meanfield_tf.cli import main
from meanfield_tf.workflow.build import run as build_run
from meanfield_tf.workflow.config import TrainConfig, load_train_config, to_dict
from meanfield_tf.workflow.rundir import RunDir
from meanfield_tf.workflow.training import train

TINY = ["dtype=float64", "heads.layers=2", "heads.heads=8", "task.tokens.n=6",
        "train.log_every=1", "train.eval_every=10", "train.checkpoint_every=10",
        "train.keep_checkpoints=3"]


def _snapshot(path: Path) -> dict:
    """Every file under `path` with the hash of its bytes (what 'nothing changed' compares)."""
    if not path.exists():
        return {}
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file() and p.name != ".lock"}


def _one_line_error(capsys, *words):
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    for w in words:
        assert w in err, (w, err)
    return err


def _params(rd: RunDir, cfg):
    state = rd.load_checkpoint(build_run(cfg).initial_state())
    return int(state.step), {k: np.asarray(v) for k, v in state.heads.params.items()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 30-step run (the bit-for-bit reference)."""
    out = tmp_path_factory.mktemp("ref") / "full"
    cfg = load_train_config(None, TINY + ["train.steps=30"])
    train(cfg, out, progress=False)
    return out, cfg


def _assert_same_final(out, reference):
    ref_out, cfg = reference
    step, got = _params(RunDir(out), cfg)
    ref_step, want = _params(RunDir(ref_out), cfg)
    assert step == ref_step == 30
    for k in want:
        assert np.array_equal(got[k], want[k]), k


# ---------------------------------------------------------------------------------------------
# Overrides change their key and nothing else


def test_partial_nested_overrides_keep_the_resolved_defaults():
    default = TrainConfig(name="teacher_student")
    cfg = load_train_config(None, ["heads.scale_A=1.5"])
    assert (cfg.heads.layers, cfg.heads.heads, cfg.heads.scale_A) == (4, 32, 1.5)
    cfg = load_train_config(None, ["task.tokens.n=8"])
    assert cfg.task.tokens.n == 8 and cfg.task.tokens.families == default.task.tokens.families
    diff = {k for k, v in to_dict(cfg).items() if to_dict(default)[k] != v}
    assert diff == {"task"}
    # a different task name starts that task from its own defaults
    cfg = load_train_config(None, ["task.name=in_context_regression", "heads.dim=3"])
    assert cfg.task.name == "in_context_regression" and cfg.task.n == 16


def test_solver_name_override_changes_only_the_ode_method(tmp_path):
    """`solver.name` is the ODE method, not a kind of section: overriding it keeps the rest of
    the solver section of the config file (it once reset the kernel and steps silently)."""
    from meanfield_tf.workflow.config import SimulateConfig, load_config

    path = tmp_path / "c.yaml"
    path.write_text("solver: {name: rk4, steps: 8, kernel: chunked, chunk_size: 16}\n")
    cfg = load_config(SimulateConfig, path, ["solver.name=heun"])
    assert (cfg.solver.name, cfg.solver.steps, cfg.solver.kernel, cfg.solver.chunk_size) == (
        "heun", 8, "chunked", 16)
    cfg = load_train_config(None, ["solver.kernel=chunked", "solver.name=midpoint"])
    assert (cfg.solver.name, cfg.solver.kernel) == ("midpoint", "chunked")


def test_weight_sums_are_checked_in_float64_with_a_fixed_tolerance():
    n = 20000
    w = np.full((1, n), 1.09 / n, np.float32)
    with pytest.raises(mf.InputError, match="sums to 1.09"):
        mf.TokenBatch(np.zeros((1, n, 2), np.float32), w)
    w = np.full((2, n), 1.0 / n, np.float32)  # normalised in float32: accepted at any n
    mf.TokenBatch(np.zeros((2, n, 2), np.float32), w)


# ---------------------------------------------------------------------------------------------
# One writer per run directory


def test_second_resume_is_refused_while_the_first_runs(reference, tmp_path):
    out = tmp_path / "run"
    train(load_train_config(None, TINY + ["train.steps=10"]), out, progress=False)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "meanfield_tf", "resume", str(out), "train.steps=30", "--quiet"]
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    lock = out / ".lock"
    deadline = time.time() + 120
    while time.time() < deadline and not (lock.exists() and lock.read_text().strip()
                                           == str(first.pid)):
        time.sleep(0.05)
    assert lock.read_text().strip() == str(first.pid), "the first resume never took the lock"
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    out1, err1 = first.communicate(timeout=600)
    assert first.returncode == 0, err1
    assert second.returncode == 2, second.stderr
    err = second.stderr.strip()
    assert "\n" not in err and f"in use by another meanfield-tf process (pid {first.pid})" in err
    _assert_same_final(out, reference)
    rows = RunDir(out).read_metrics()
    assert [r["step"] for r in rows if r["kind"] == "train"] == list(range(30))


# ---------------------------------------------------------------------------------------------
# Resume continues the same experiment


@pytest.mark.parametrize("override, key", [
    ("seed=5", "seed"), ("task.perturbation=0.9", "task.perturbation"),
    ("heads.heads=4", "heads.heads"), ("dtype=float32", "dtype"),
])
def test_resume_refuses_a_different_experiment(reference, override, key, capsys):
    out, _ = reference
    before = _snapshot(out)
    assert main(["resume", str(out), override]) == 2
    _one_line_error(capsys, f"resume cannot change {key}", "start a new run")
    assert _snapshot(out) == before


def test_resume_records_its_history(tmp_path):
    import json

    out = tmp_path / "run"
    train(load_train_config(None, TINY + ["train.steps=10"]), out, progress=False)
    assert main(["resume", str(out), "train.steps=20", "train.learning_rate=1.0", "--quiet"]) == 0
    history = json.loads((out / "manifest.json").read_text())["history"]
    assert len(history) == 1 and history[0]["from_step"] == 10
    assert "train.learning_rate=1.0" in history[0]["command"]
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["learning_rate"] == 1.0


def test_empty_or_tagged_config_yaml_is_refused(reference, tmp_path, capsys):
    for text, words in (("", "not a complete resolved config"),
                        ("!!python/object:os.system {}\n", "is damaged")):
        out = tmp_path / f"run{len(text)}"
        out.mkdir()
        (out / "config.yaml").write_text(text)
        before = _snapshot(out)
        assert main(["resume", str(out)]) == 2
        _one_line_error(capsys, words)
        assert _snapshot(out) == before


# ---------------------------------------------------------------------------------------------
# Damaged checkpoints and interrupted runs


@pytest.mark.parametrize("damage", ["flip", "truncate", "empty", "garbage"])
def test_damaged_latest_checkpoint_resumes_from_the_previous_one(reference, tmp_path, damage,
                                                                  capsys):
    out = tmp_path / "run"
    train(load_train_config(None, TINY + ["train.steps=20"]), out, progress=False)
    rd = RunDir(out)
    latest = rd.checkpoints()[-1][1]
    data = bytearray(latest.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x01
    elif damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "empty":
        data = b""
    else:
        data = os.urandom(len(data))
    latest.write_bytes(bytes(data))
    (rd.checkpoint_dir / ".step_00000030.eqx.x1.tmp").write_bytes(b"partial")  # a cut write
    assert main(["resume", str(out), "train.steps=30", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "skipped damaged checkpoint step_00000020.eqx" in err
    assert not list(rd.checkpoint_dir.glob(".*.tmp"))
    _assert_same_final(out, reference)


def test_killed_before_the_first_checkpoint_resumes_from_step_zero(reference, tmp_path, capsys):
    out = tmp_path / "run"
    train(load_train_config(None, TINY + ["train.steps=30"]), out, progress=False)
    rd = RunDir(out)
    for _, p in rd.checkpoints():  # as if killed before any checkpoint was written
        p.unlink()
    rd.metrics_path.write_text('{"kind": "eval", "step": 0, "w2": 0.0}\n{"kind": "tra')
    assert main(["train", "--out", str(out)] + TINY + ["train.steps=30"]) == 2
    _one_line_error(capsys, "already holds a run", "meanfield-tf resume")
    assert main(["resume", str(out), "--quiet"]) == 0
    _assert_same_final(out, reference)


def test_out_must_be_new_empty_or_this_run(tmp_path, capsys):
    out = tmp_path / "thesis"
    out.mkdir()
    (out / "config.yaml").write_bytes(b"")  # someone else's files
    (tmp_path / "thesis" / "notes.txt").write_text("keep me")
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep me too")
    before = _snapshot(tmp_path)
    assert main(["train", "--out", str(other)] + TINY + ["train.steps=2"]) == 2
    _one_line_error(capsys, "non-empty directory that holds no run")
    afile = tmp_path / "file"
    afile.write_text("x")
    before = _snapshot(tmp_path)
    assert main(["train", "--out", str(afile)] + TINY + ["train.steps=2"]) == 2
    _one_line_error(capsys, "is a file")
    assert _snapshot(tmp_path) == before


def test_divergence_bound_keeps_the_last_good_checkpoint_and_config(tmp_path, capsys):
    out = tmp_path / "run"
    train(load_train_config(None, TINY + ["train.steps=10", "train.checkpoint_every=1"]), out,
          progress=False)
    rd = RunDir(out)
    config_before = rd.config_path.read_bytes()
    assert main(["resume", str(out), "train.steps=40", "train.learning_rate=1e6", "--quiet"]) == 2
    _one_line_error(capsys, "lower train.learning_rate")
    assert rd.config_path.read_bytes() == config_before  # the diverging rate is not kept
    rows = [r for r in rd.read_metrics() if r["kind"] == "train"]
    best = min(r["loss"] for r in rows)
    last_ckpt = rd.checkpoints()[-1][0]
    good = [r["loss"] for r in rows if r["step"] == last_ckpt - 1]
    assert good and np.isfinite(good[0]) and good[0] <= 1e4 * best


def test_run_files_share_one_mode(reference):
    out, _ = reference
    mask = os.umask(0)
    os.umask(mask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.rglob("*") if p.is_file()
             and p.name != ".lock"}
    assert set(modes.values()) == {0o666 & ~mask}, modes


# ---------------------------------------------------------------------------------------------
# Bad input: one line, exit 2


@pytest.mark.parametrize("override, words", [
    ("train.learning_rate=.nan", "train.learning_rate must be > 0 and finite"),
    ("train.learning_rate=.inf", "train.learning_rate must be > 0 and finite"),
    ("seed=1180591620717411303424", "seed must be an integer in [0, 2^32)"),
    ("task=5", "task must be a mapping"),
    ("name=../../x", "must be a plain run name"),
    ("heads.layers=[1, 2", "not valid YAML"),
    ("solver.rtol=.inf", "solver.rtol must be > 0 and finite"),
])
def test_bad_overrides(override, words, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), override]) == 2
    _one_line_error(capsys, words)
    assert not out.exists()


def test_bad_config_files(tmp_path, capsys):
    (tmp_path / "latin1.yaml").write_bytes("name: caf\xe9\n".encode("latin-1"))
    (tmp_path / "recursive.yaml").write_text("a: &x [*x]\n")
    bomb = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
        for p, c in zip("abcdef", "bcdefg"))
    (tmp_path / "bomb.yaml").write_text(bomb)
    cases = [(tmp_path, "is not a file"), (tmp_path / "latin1.yaml", "not UTF-8"),
             (tmp_path / "recursive.yaml", "recursive"), (tmp_path / "bomb.yaml", "expands to")]
    for path, words in cases:
        assert main(["train", "--config", str(path), "--out", str(tmp_path / "o")]) == 2
        _one_line_error(capsys, words)
    assert not (tmp_path / "o").exists()


def test_metrics_that_are_not_a_file_or_lack_a_step(reference, tmp_path, capsys):
    out, _ = reference
    rows = RunDir(out).read_metrics()
    assert all(isinstance(r["step"], int) for r in rows)
    broken = tmp_path / "run"
    broken.mkdir()
    (broken / "config.yaml").write_bytes((out / "config.yaml").read_bytes())
    (broken / "metrics.jsonl").mkdir()
    assert main(["resume", str(broken)]) == 2
    _one_line_error(capsys, "metrics.jsonl", "is not a file")


def test_output_paths(tmp_path, capsys):
    x = np.random.default_rng(0).normal(size=(1, 4, 2))
    np.savez(tmp_path / "t.npz", x=x)
    A = np.random.default_rng(1).normal(size=(2, 3, 2, 2)) * 0.3
    np.savez(tmp_path / "h.npz", A=A, V=A)
    base = ["simulate", "--tokens", str(tmp_path / "t.npz"), "--heads", str(tmp_path / "h.npz")]
    (tmp_path / "adir").mkdir()
    assert main(base + ["--out", str(tmp_path / "adir")]) == 2
    _one_line_error(capsys, "is a directory")
    (tmp_path / "afile").write_text("x")
    assert main(base + ["--out", str(tmp_path / "afile" / "o.npz")]) == 2
    _one_line_error(capsys, "a parent of it is a file")
    np.savez(tmp_path / "y.npz", y=x)
    grad = ["grad", "--tokens", str(tmp_path / "t.npz"), "--heads", str(tmp_path / "h.npz"),
            "--targets", str(tmp_path / "y.npz"), "--kernel", "chunked", "--chunk-size", "0",
            "--out", str(tmp_path / "g.npz")]
    assert main(grad) == 2
    _one_line_error(capsys, "chunk_size must be > 0 and finite")
    assert not (tmp_path / "g.npz").exists()


@pytest.mark.parametrize("x, words", [
    (np.ones((1, 3, 2)) * (1 + 2j), "is complex"),
    (np.array([[["a", "b"]] * 3]), "not numbers"),
    (np.array([[[None, 1.0]] * 3], dtype=object), "is not a readable .npz archive"),
    (np.full((1, 3, 2), 1e39), "beyond float32's range"),
    (np.zeros((0, 3, 2)), "no sequences (B = 0)"),
    (np.zeros((1, 3, 0)), "dimension d = 0"),
])
def test_bad_token_arrays_are_one_line_errors(x, words, tmp_path, capsys):
    np.savez(tmp_path / "t.npz", x=x)
    A = np.random.default_rng(1).normal(size=(2, 3, 2, 2)) * 0.3
    np.savez(tmp_path / "h.npz", A=A, V=A)
    out = tmp_path / "o.npz"
    assert main(["simulate", "--tokens", str(tmp_path / "t.npz"), "--heads",
                 str(tmp_path / "h.npz"), "--out", str(out)]) == 2
    _one_line_error(capsys, words)
    assert not out.exists()


def test_ntk_refuses_overflowing_scores(tmp_path, capsys):
    x = np.random.default_rng(0).normal(size=(3, 4, 2)) * 1e30
    np.savez(tmp_path / "t.npz", x=x)
    assert main(["ntk", "--tokens", str(tmp_path / "t.npz"), "--out", str(tmp_path / "r.json")]) == 2
    _one_line_error(capsys, "the scores z . y reach", "--z-scale")
    assert not (tmp_path / "r.json").exists()


def test_unreachable_coordinator_is_a_config_error():
    from meanfield_tf.workflow.config import DistributedConfig
    from meanfield_tf.workflow.processes import initialize_distributed

    from conftest import free_port

    cfg = DistributedConfig(coordinator_address=f"127.0.0.1:{free_port()}", num_processes=2,
                            process_id=1, timeout_s=1)
    with pytest.raises(mf.ConfigError, match="did not answer within 1 s") as err:
        initialize_distributed(cfg)
    assert "\n" not in str(err.value) and "start process 0 first" in str(err.value)


def test_plot_path_is_checked_before_anything_is_written(tmp_path, capsys):
    x = np.random.default_rng(0).normal(size=(1, 4, 2))
    np.savez(tmp_path / "t.npz", x=x)
    A = np.random.default_rng(1).normal(size=(2, 3, 2, 2)) * 0.3
    np.savez(tmp_path / "h.npz", A=A, V=A)
    (tmp_path / "plots").mkdir()
    out = tmp_path / "o.npz"
    assert main(["simulate", "--tokens", str(tmp_path / "t.npz"), "--heads", str(tmp_path / "h.npz"),
                 "--out", str(out), "--plot", str(tmp_path / "plots")]) == 2
    _one_line_error(capsys, "--plot", "is a directory")
    assert not out.exists()
