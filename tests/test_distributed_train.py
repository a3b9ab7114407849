"""`meanfield-tf train` on two processes (jax.distributed on localhost, gloo CPU collectives)
equals the single-process run, and only process 0 writes the run directory.

Two processes, each with 2 simulated CPU devices, run the *same* command line
(`python -m meanfield_tf train --out run ...` with a `heads=2 x data=2` mesh over the 4 global
devices), each in its own working directory: the relative `--out` then names a different
directory per process, so a write by process 1 would show up in its directory. The
reference is the same config in this (single-device) process. Then both runs are resumed for
two more steps (on two processes, each reading the checkpoint, and on one).

About 75 s of CPU in all (mostly process start-up and compilation), hence `slow`.

Tolerance: sharding only regroups the float64 sums of the head average and the batch mean
(a few ulps per step, the same bound as `test_sharding.py` / `test_distributed.py`), so the
final parameters agree to 1e-12 relative.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import free_port, two_process_env

from meanfield_tf.cli import main
from meanfield_tf.workflow.rundir import RunDir, load_run

RTOL = 1e-12
STEPS = 6
CONFIG = ["dtype=float64", "heads.layers=2", "heads.heads=8", "task.tokens.n=6",
          f"train.steps={STEPS}", "train.log_every=1", "train.eval_every=3",
          "train.checkpoint_every=3"]
MESH = ["mesh.heads=2", "mesh.data=2"]  # the head axis crosses the process boundary


def _launch(args: list[str], cwds: list) -> list[subprocess.Popen]:
    """The command `python -m meanfield_tf ARGS` on two processes, one per working directory."""
    port = free_port()
    procs = []
    for pid, cwd in enumerate(cwds):
        env = two_process_env(pid, port)
        procs.append(subprocess.Popen([sys.executable, "-m", "meanfield_tf", *args], cwd=cwd,
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    return procs


def _wait(procs) -> list[tuple[str, str]]:
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=300))  # a hang guard, not a speed test
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for pid, (p, (out, err)) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"process {pid} failed:\n{out[-2000:]}\n{err[-4000:]}"
    return logs


def _rel(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist_train")
    cwds = [root / "p0", root / "p1"]
    for c in cwds:
        c.mkdir()
    procs = _launch(["train", "--quiet", "--out", "run", *CONFIG, *MESH], cwds)
    # the single-process reference, meanwhile, in this process (1 device, no mesh)
    single = root / "single"
    assert main(["train", "--quiet", "--out", str(single), *CONFIG]) == 0
    logs = _wait(procs)
    return {"dist": cwds[0] / "run", "p1": cwds[1], "single": single, "logs": logs}


@pytest.mark.slow
def test_two_process_training_equals_single_process(runs):
    _, _, dist = load_run(runs["dist"])
    _, _, single = load_run(runs["single"])
    assert int(dist.step) == int(single.step) == STEPS
    for k in single.heads.params:
        assert _rel(dist.heads.params[k], single.heads.params[k]) <= RTOL, k
    # the logged losses (computed on the sharded mesh) agree as well
    loss = {r["step"]: r["loss"] for r in RunDir(runs["single"]).read_metrics()
            if r["kind"] == "train"}
    dist_loss = {r["step"]: r["loss"] for r in RunDir(runs["dist"]).read_metrics()
                 if r["kind"] == "train"}
    assert dist_loss.keys() == loss.keys() == set(range(STEPS))
    assert max(_rel(dist_loss[s], loss[s]) for s in loss) <= RTOL


@pytest.mark.slow
def test_only_process_zero_writes_the_run_directory(runs):
    assert list(runs["p1"].iterdir()) == []  # process 1 ran the same command and wrote nothing
    rd = RunDir(runs["dist"])
    rows = rd.read_metrics()
    steps = [(r["kind"], r["step"]) for r in rows]
    assert len(steps) == len(set(steps))  # every row once
    assert [s for s, _ in rd.checkpoints()] == [3, 6]
    man = json.loads((rd.path / "manifest.json").read_text())
    assert man["processes"] == 2 and len(man["devices"]) == 4
    assert man["coordinator"].startswith("127.0.0.1:")
    assert (rd.path / "figures" / "loss.png").exists()
    # the per-process id is not stored (a resume takes it from its own environment)
    assert rd.read_config().distributed.process_id is None
    # process 0 reports, process 1 stays silent; gloo's connection lines reach neither
    (out0, err0), (out1, err1) = runs["logs"]
    assert "run directory: run" in out0
    assert out1 == ""
    assert not any("[Gloo]" in text for text in (out0, err0, out1, err1))


@pytest.fixture(scope="module")
def resumed(runs):
    """Both runs continued to `STEPS + 2` steps: `meanfield-tf resume RUN train.steps=...` on two
    processes (each reads the checkpoint and re-shards it; process 0 appends to the run) and on
    one."""
    more = f"train.steps={STEPS + 2}"
    run_dir = str(runs["dist"].resolve())  # a directory both processes see
    procs = _launch(["resume", "--quiet", run_dir, more], [runs["dist"].parent, runs["p1"]])
    assert main(["resume", "--quiet", str(runs["single"]), more]) == 0
    _wait(procs)
    return runs


@pytest.mark.slow
def test_two_process_resume_equals_single_process(resumed):
    _, _, dist = load_run(resumed["dist"])
    _, _, single = load_run(resumed["single"])
    assert int(dist.step) == int(single.step) == STEPS + 2
    for k in single.heads.params:
        assert _rel(dist.heads.params[k], single.heads.params[k]) <= RTOL, k
    rows = RunDir(resumed["dist"]).read_metrics()
    steps = [(r["kind"], r["step"]) for r in rows]
    assert len(steps) == len(set(steps))
    assert {s for k, s in steps if k == "train"} == set(range(STEPS + 2))
    assert list(resumed["p1"].iterdir()) == []
