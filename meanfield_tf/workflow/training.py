"""The training loop: from a `TrainConfig` to a run directory, with checkpoints and resume.

`train(cfg, out)` is a short sequence of named steps: open the run directory (a new run, or the
checkpoint of a resumed one), place the state on the device mesh, then for every step draw the
batch, take the jitted training step, check the loss, log, evaluate and checkpoint at the
configured cadence; at the end draw the figures and summarise. The files are described in
`rundir.py`. The optional `logging` section adds the readout NTK at step 0 and at every
checkpoint (`run_ntk.py`) and a TensorBoard copy of every metrics row (`tensorboard.py`).

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

from .._errors import ConfigError, InputError, SolverError
from .._flow import flow
from .._sharding import gather_to_host
from .._training import TrainingDiverged, TrainStep, set_learning_rate
from . import build
from .build import Run, TrainState
from .config import TrainConfig
from .evaluation import distance_travelled, evaluate, summarize
from .figures import write_run_figures
from .files import atomic_write
from .processes import agree, barrier, run_mesh, shard_run_batch, shard_state
from .progress import Progress
from .rundir import RunDir
from .run_ntk import probe
from .tensorboard import TensorBoardLog, missing_extra


def train(cfg: TrainConfig, out, *, resume: bool = False, argv: list[str] | None = None,
          progress: bool = True, figures: bool = True) -> dict[str, Any]:
    """Run (or resume) the training `cfg` describes in the run directory `out`.

    A new run needs `out` new or empty; a resumed run continues from its newest intact
    checkpoint (from step 0 when it stopped before its first one). The process that writes `out`
    holds its lock for the whole call: a second writer is refused.

    **Returns:** a summary dict (final step, loss, first loss, evaluation metrics, paths, and
    `traces`: how many times the training step was compiled during this call). Raises
    `TrainingDiverged` if the loss or the parameters become non-finite or the loss exceeds
    `train.divergence_factor` times its best value: the run stops, the last checkpoint stays
    as it was (and a resume's config is restored), and `SolverError` if a depth solve fails.
    """
    main = jax.process_index() == 0  # the only process that writes the run directory
    rd = RunDir(out)
    if not resume:
        problem = _not_a_new_run(rd) if main else None
        if agree(problem is not None):  # process 0's verdict, so that every process stops together
            raise InputError(problem or f"run directory {str(rd.path)!r} cannot take a new run")
    missing = missing_extra() if main and cfg.logging.tensorboard else None
    if agree(missing is not None):
        raise ConfigError(missing or "logging.tensorboard: tensorboardX is missing on process 0")
    if main:
        rd.lock()  # before anything slow: a second writer is refused at once
    loop = None
    try:
        previous_config = rd.config_path.read_bytes() if resume and main and rd.is_run() else None
        run = build.run(cfg)
        traces_before = TrainStep.num_traces()
        state = _open(rd, run, resume, argv, main)
        loop = _Loop(rd, run, state, resume, main)
        _steps(loop, progress and main, previous_config)
        final_heads = gather_to_host(loop.heads)  # every process (a collective)
        if figures and main:
            _draw(rd, run, final_heads)
        barrier("end")  # the run directory is complete before any process returns
    finally:
        if loop is not None and loop.tensorboard is not None:
            loop.tensorboard.close()
        rd.unlock()
    summary = summarize(rd)
    summary["traces"] = TrainStep.num_traces() - traces_before
    return summary


def _steps(loop: "_Loop", progress: bool, previous_config: bytes | None) -> None:
    """Every remaining step; on divergence a resume's previous config is put back."""
    total = loop.run.cfg.train.steps
    bar = Progress(loop.start, total) if progress else None
    try:
        for step in range(loop.start, total):
            loop.step(step, bar)
        loop.finish()
    except TrainingDiverged:
        if previous_config is not None:  # keep the config of the last good state
            atomic_write(loop.rd.config_path, lambda f: f.write(previous_config))
        raise
    finally:
        if bar is not None:
            bar.close()


def _open(rd: RunDir, run: Run, resume: bool, argv, main: bool) -> TrainState:
    """The state to start from: a new run directory at step 0, or the newest intact checkpoint
    of a resumed one (step 0 if there is none)."""
    cfg = run.cfg
    state = run.initial_state()
    if resume:
        rd.read_metrics()  # a damaged metrics file is reported before anything changes
        if main:
            rd.clean_temporaries()
        resumed, skipped = rd.load_newest(state)  # on every process
        for line in skipped:
            print(f"warning: {line}", file=sys.stderr)
        if resumed is None:
            print(f"note: {rd.path} has no intact checkpoint; the run restarts from step 0 with "
                  f"its config", file=sys.stderr)
        else:
            state = eqx.tree_at(lambda s: s.opt_state, resumed,
                                set_learning_rate(resumed.opt_state, cfg.train.learning_rate))
        if main:
            rd.truncate_metrics(int(state.step))
            rd.write_config(cfg)
            rd.record_resume(argv, int(state.step), skipped)
        return state
    if main:
        rd.write_config(cfg)
        rd.write_manifest(cfg, argv)
    return state


def _not_a_new_run(rd: RunDir) -> str | None:
    """Why `rd` cannot take a new run (`None` when it can: new, or an empty directory)."""
    path = rd.path
    if path.exists() and not path.is_dir():
        return f"--out {str(path)!r} is a file; give a new or empty directory"
    if not path.exists() or not [p for p in path.iterdir() if p.name != ".lock"]:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            return f"cannot create run directory {str(path)!r} ({err.strerror}); choose another --out"
        return None
    if rd.is_run():
        return (f"run directory {str(path)!r} already holds a run; resume it with "
                f"`meanfield-tf resume {path}` (it restarts from step 0 when no checkpoint was "
                f"written) or choose another --out")
    return (f"--out {str(path)!r} is a non-empty directory that holds no run; give a new or "
            f"empty directory so that nothing in it is overwritten")


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
        # the best loss so far (every process reads it: a resume needs a shared file system)
        losses = [r["loss"] for r in rd.read_metrics() if r.get("kind") == "train"
                  and r["step"] < self.start and np.isfinite(r.get("loss", np.nan))] if resume else []
        self.best = min(losses, default=np.inf)
        self.pending: TrainState | None = None  # a checkpoint waiting for its loss to be checked
        ckpts = rd.checkpoints()
        self.last_ckpt = ckpts[-1][0] if ckpts else None
        self.tensorboard = TensorBoardLog(rd.path) if main and run.cfg.logging.tensorboard else None
        self.ntk = None
        if run.cfg.logging.ntk:
            self.ntk, why = probe(run)
            if why and main:
                print(f"note: {why}", file=sys.stderr)
        if self.start == 0:
            row = {"kind": "eval", "step": 0, **evaluate(run, self.heads), "wall_s": 0.0}
            self.log(row)
            self._log_ntk(0, run.heads0)

    def log(self, row: dict) -> None:
        """Append a metrics row (process 0 only), and copy it to TensorBoard when asked."""
        if self.main:
            self.rd.append_metrics(row)
            if self.tensorboard is not None:
                self.tensorboard.write(row)

    def _log_ntk(self, step: int, host_heads) -> None:
        """The NTK row at `step` (`logging.ntk`), from a host copy of the heads: process 0 only,
        not a collective."""
        if self.ntk is not None and self.main:
            self.log({"kind": "ntk", "step": step, "time": self.tau,
                      **self.ntk.measure(host_heads), "wall_s": self.wall()})

    def wall(self) -> float:
        return round(self.prior_wall + time.perf_counter() - self.t_wall, 4)

    def step(self, step: int, bar) -> None:
        """Take training step `step`, then log, evaluate and checkpoint as configured."""
        tc = self.run.cfg.train
        batch = self.run.batch(self.key, step)
        if self.mesh is not None:
            batch = shard_run_batch(batch, self.run.cfg.mesh, self.mesh)
        before = self.heads
        self.heads, self.opt_state, info = self.run.step(self.heads, self.opt_state, batch)
        loss, gnorm = float(info.loss), float(info.grad_norm)
        self._check(step, loss, gnorm, before, batch)  # the loss at `before`: the pending state's
        self._write_pending()
        base = float(self.opt_state.hyperparams["learning_rate"])
        lr = base * self.run.optimizer.factor(step)  # the step actually taken (schedule applied)
        done = step + 1
        if step % tc.log_every == 0 or done == tc.steps:
            self.log({"kind": "train", "step": step, "time": self.tau, "loss": loss,
                      "grad_norm": gnorm, "lr": lr, "learning_rate": base, "wall_s": self.wall()})
        self.tau += lr  # training time after this step
        if bar is not None:
            bar.update(done, loss)
        if done % tc.eval_every == 0 or done == tc.steps:
            row = {"kind": "eval", "step": done, **evaluate(self.run, self.heads)}  # collective
            self.log({**row, "wall_s": self.wall()})
        elif done % tc.w2_every == 0:  # the distance travelled, more often than evaluations
            row = {"w2": distance_travelled(self.run, self.heads)}  # collective
            if self.heads.has_units:
                row["w2_units"] = distance_travelled(self.run, self.heads, units=True)
            self.log({"kind": "w2", "step": done, "time": self.tau, **row})
        if done % tc.checkpoint_every == 0 or done == tc.steps:
            self._hold_checkpoint(done)

    def finish(self) -> None:
        """Check the loss at the final state (a zero-size step: nothing recompiles) and write its
        pending checkpoint."""
        if self.pending is None:
            return
        done = int(self.pending.step)
        batch = self.run.batch(self.key, done)
        if self.mesh is not None:
            batch = shard_run_batch(batch, self.run.cfg.mesh, self.mesh)
        _, _, info = self.run.step(self.heads, set_learning_rate(self.opt_state, 0.0), batch)
        self._check(done, float(info.loss), float(info.grad_norm), self.heads, batch)
        self._write_pending()

    def _check(self, step: int, loss: float, gnorm: float, heads, batch) -> None:
        """Stop on a failed depth solve, a non-finite loss, or a loss past the divergence bound."""
        where = (f"the last good checkpoint (step {self.last_ckpt}) is in "
                 f"{self.rd.checkpoint_dir}" if self.last_ckpt is not None
                 else "no checkpoint was written")
        if not (np.isfinite(loss) and np.isfinite(gnorm)):
            try:  # a failed adaptive solve also makes the loss NaN: name it if it is the cause
                flow(heads, batch.tokens, self.run.solver).check()
            except SolverError as err:
                raise SolverError(f"at training step {step}, {err}; {where}") from None
            raise TrainingDiverged(
                f"the loss became {loss} (gradient norm {gnorm}) at step {step}; {where}; "
                f"lower train.learning_rate or the head scales")
        bound = self.run.cfg.train.divergence_factor
        if loss > bound * self.best:
            raise TrainingDiverged(
                f"the loss became {loss:.4g} at step {step}, more than "
                f"train.divergence_factor={bound:g} times its best value {self.best:.4g}; {where}; "
                f"lower train.learning_rate")
        self.best = min(self.best, loss)

    def _hold_checkpoint(self, done: int) -> None:
        """Gather the state after `done` updates; it is written once the loss at it passes the
        checks (at the next step, or in `finish`), so that a checkpoint is always a good one."""
        # the whole state on every host (a collective when it spans several processes)
        host = gather_to_host(TrainState(jnp.asarray(done, self.step_dtype), self.heads,
                                         self.opt_state, self.key))
        if not all(np.all(np.isfinite(a)) for a in jax.tree.leaves(host.heads.params)):
            raise TrainingDiverged(
                f"the head parameters became non-finite at step {done}; the last good "
                f"checkpoint (step {self.last_ckpt}) is in {self.rd.checkpoint_dir}; lower "
                f"train.learning_rate")
        self.pending = host
        self._log_ntk(done, host.heads)

    def _write_pending(self) -> None:
        if self.pending is None:
            return
        done = int(self.pending.step)
        if self.main:
            self.rd.save_checkpoint(self.pending, self.run.cfg.train.keep_checkpoints)
        barrier(f"checkpoint {done}")  # no process runs ahead of the written checkpoint
        self.last_ckpt, self.pending = done, None


def _draw(rd: RunDir, run: Run, heads) -> None:
    try:
        write_run_figures(rd, run, heads)
    except Exception as err:  # figures must never lose a finished run
        print(f"warning: could not draw the figures ({type(err).__name__}: {err})",
              file=sys.stderr)


def _training_time_at(rd: RunDir, start: int, optimizer) -> float:
    """Training time τ = Σ_{j<start} lr_j · shape(j) of a run resumed at step `start`.

    Continues from the last logged training row before `start` with that row's base learning
    rate (it only changes at a resume), so the `time` column stays right across resumes that
    change `train.learning_rate`.
    """
    rows = [r for r in rd.read_metrics() if r.get("kind") == "train" and r["step"] < start
            and r.get("time") is not None]
    if not rows:
        return 0.0
    last = max(rows, key=lambda r: r["step"])
    factors = (optimizer.factor(j) for j in range(last["step"], start))
    base = last.get("learning_rate", last["lr"])  # rows of older runs hold the base rate in lr
    return float(last["time"]) + float(base) * sum(factors)


def _prior_wall(rd: RunDir) -> float:
    rows = rd.read_metrics()
    return max((r.get("wall_s", 0.0) for r in rows), default=0.0)
