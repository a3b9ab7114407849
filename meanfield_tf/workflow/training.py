"""The training loop: from a `TrainConfig` to a run directory, with checkpoints and resume.

`train(cfg, out)` is a short sequence of named steps: open the run directory (a new run, or the
checkpoint of a resumed one), place the state on the device mesh, then for every step draw the
batch, take the jitted training step, check the loss, log, evaluate and checkpoint at the
configured cadence; at the end draw the figures and summarise. The files are described in
`rundir.py`.

Everything a run computes is a function of the config: the initial heads and the task data are
rebuilt from the seed, and the batch of step k depends only on the PRNG key and k, so a run
resumed from a checkpoint ends bit-identical (on CPU) to an uninterrupted one.

**Several processes** (multi-host; the `distributed:` section or the `MEANFIELD_TF_*`
environment, see `processes.py`): join them with `initialize_distributed` first, then call
`train` on every process with the same arguments. Every process builds the same heads, task and
batches, runs the same steps and evaluations (they are collectives), and gathers the state for a
checkpoint (`gather_to_host`); only process 0 writes the run directory, and the others wait at a
barrier after each checkpoint. A resume reads the checkpoint on every process (the run directory
must be on a file system they all see) and re-shards it on the current mesh.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._errors import InputError
from .._sharding import gather_to_host
from .._training import TrainingDiverged, TrainStep, set_learning_rate
from . import build
from .build import Run, TrainState
from .config import TrainConfig
from .evaluation import evaluate, summarize
from .figures import write_run_figures
from .processes import agree, barrier, run_mesh, shard_run_batch, shard_state
from .progress import Progress
from .rundir import RunDir


def train(cfg: TrainConfig, out, *, resume: bool = False, argv: list[str] | None = None,
          progress: bool = True, figures: bool = True) -> dict[str, Any]:
    """Run (or resume) the training `cfg` describes in the run directory `out`.

    **Returns:** a summary dict (final step, loss, first loss, evaluation metrics, paths, and
    `traces`: how many times the training step was compiled during this call). Raises
    `TrainingDiverged` if the loss or the parameters become non-finite: the run stops, the last
    good checkpoint stays as it was.
    """
    main = jax.process_index() == 0  # the only process that writes the run directory
    rd = RunDir(out)
    run = build.run(cfg)
    traces_before = TrainStep.num_traces()
    state = _open(rd, run, resume, argv, main)
    loop = _Loop(rd, run, state, resume, main)
    bar = Progress(loop.start, cfg.train.steps) if progress and main else None
    try:
        for step in range(loop.start, cfg.train.steps):
            loop.step(step, bar)
    finally:
        if bar is not None:
            bar.close()
    final_heads = gather_to_host(loop.heads)  # every process (a collective)
    if figures and main:
        _draw(rd, run, final_heads)
    barrier("end")  # the run directory is complete before any process returns
    summary = summarize(rd)
    summary["traces"] = TrainStep.num_traces() - traces_before
    return summary


def _open(rd: RunDir, run: Run, resume: bool, argv, main: bool) -> TrainState:
    """The state to start from: a new run directory at step 0, or the last checkpoint."""
    cfg = run.cfg
    state = run.initial_state()
    if resume:
        state = rd.load_checkpoint(state)  # on every process
        state = eqx.tree_at(lambda s: s.opt_state, state,
                            set_learning_rate(state.opt_state, cfg.train.learning_rate))
        if main:
            rd.truncate_metrics(int(state.step))
            rd.write_config(cfg)
        return state
    taken = False
    if main:
        rd.path.mkdir(parents=True, exist_ok=True)
        taken = bool(rd.checkpoints() or rd.metrics_path.exists())
    if agree(taken):  # process 0's verdict, so that every process stops together
        raise InputError(f"run directory {str(rd.path)!r} already holds a run; resume it with "
                         f"`meanfield-tf resume {rd.path}` or choose another --out")
    if main:
        rd.write_config(cfg)
        rd.write_manifest(cfg, argv)
    return state


class _Loop:
    """The state of a training loop between steps, and one step of it."""

    def __init__(self, rd: RunDir, run: Run, state: TrainState, resume: bool, main: bool):
        self.rd, self.run, self.main = rd, run, main
        self.mesh = run_mesh(run.cfg.mesh, run.heads0.num_heads)
        self.heads, self.opt_state, self.key = state.heads, state.opt_state, state.key
        self.step_dtype = state.step.dtype
        if self.mesh is not None:
            self.heads, self.opt_state = shard_state(self.heads, self.opt_state, self.mesh)
        self.start = int(state.step)
        self.t_wall = time.perf_counter()
        self.prior_wall = _prior_wall(rd) if resume and main else 0.0
        self.tau = _training_time_at(rd, self.start, run.optimizer) if resume and main else 0.0
        ckpts = rd.checkpoints()
        self.last_ckpt = ckpts[-1][0] if ckpts else None
        if self.start == 0:
            row = {"kind": "eval", "step": 0, **evaluate(run, self.heads), "wall_s": 0.0}
            if main:
                rd.append_metrics(row)

    def wall(self) -> float:
        return round(self.prior_wall + time.perf_counter() - self.t_wall, 4)

    def step(self, step: int, bar) -> None:
        """Take training step `step`, then log, evaluate and checkpoint as configured."""
        tc = self.run.cfg.train
        batch = self.run.batch(self.key, step)
        if self.mesh is not None:
            batch = shard_run_batch(batch, self.run.cfg.mesh, self.mesh)
        self.heads, self.opt_state, info = self.run.step(self.heads, self.opt_state, batch)
        loss, gnorm = float(info.loss), float(info.grad_norm)
        self._check_finite(step, loss, gnorm)
        lr = float(self.opt_state.hyperparams["learning_rate"])
        done = step + 1
        if self.main and (step % tc.log_every == 0 or done == tc.steps):
            self.rd.append_metrics({"kind": "train", "step": step, "time": self.tau, "loss": loss,
                                    "grad_norm": gnorm, "lr": lr, "wall_s": self.wall()})
        self.tau += lr * self.run.optimizer.factor(step)  # training time after this step
        if bar is not None:
            bar.update(done, loss)
        if done % tc.eval_every == 0 or done == tc.steps:
            row = {"kind": "eval", "step": done, **evaluate(self.run, self.heads)}  # collective
            if self.main:
                self.rd.append_metrics({**row, "wall_s": self.wall()})
        if done % tc.checkpoint_every == 0 or done == tc.steps:
            self._checkpoint(done)

    def _check_finite(self, step: int, loss: float, gnorm: float) -> None:
        if not (np.isfinite(loss) and np.isfinite(gnorm)):
            where = (f"the last good checkpoint (step {self.last_ckpt}) is in "
                     f"{self.rd.checkpoint_dir}" if self.last_ckpt is not None
                     else "no checkpoint was written")
            raise TrainingDiverged(
                f"the loss became {loss} (gradient norm {gnorm}) at step {step}; {where}; "
                f"lower train.learning_rate or the head scales")

    def _checkpoint(self, done: int) -> None:
        # the whole state on every host (a collective when it spans several processes)
        host = gather_to_host(TrainState(jnp.asarray(done, self.step_dtype), self.heads,
                                         self.opt_state, self.key))
        if not all(np.all(np.isfinite(a)) for a in jax.tree.leaves(host.heads.params)):
            raise TrainingDiverged(
                f"the head parameters became non-finite at step {done}; the last good "
                f"checkpoint (step {self.last_ckpt}) is in {self.rd.checkpoint_dir}; lower "
                f"train.learning_rate")
        if self.main:
            self.rd.save_checkpoint(host, self.run.cfg.train.keep_checkpoints)
        barrier(f"checkpoint {done}")  # no process runs ahead of the written checkpoint
        self.last_ckpt = done


def _draw(rd: RunDir, run: Run, heads) -> None:
    try:
        write_run_figures(rd, run, heads)
    except Exception as err:  # figures must never lose a finished run
        print(f"warning: could not draw the figures ({type(err).__name__}: {err})",
              file=sys.stderr)


def _training_time_at(rd: RunDir, start: int, optimizer) -> float:
    """Training time τ = Σ_{j<start} lr_j · shape(j) of a run resumed at step `start`.

    Continues from the last logged training row before `start` with that row's learning rate
    (the rate only changes at a resume), so the `time` column stays right across resumes that
    change `train.learning_rate`.
    """
    rows = [r for r in rd.read_metrics() if r.get("kind") == "train" and r["step"] < start
            and r.get("time") is not None]
    if not rows:
        return 0.0
    last = max(rows, key=lambda r: r["step"])
    factors = (optimizer.factor(j) for j in range(last["step"], start))
    return float(last["time"]) + float(last["lr"]) * sum(factors)


def _prior_wall(rd: RunDir) -> float:
    rows = rd.read_metrics()
    return max((r.get("wall_s", 0.0) for r in rows), default=0.0)
