"""Training runs: from a `TrainConfig` to a run directory, with checkpoints and resume.

A run directory holds

- `config.yaml`: the resolved configuration (every default spelled out; `resume` reads it back);
- `manifest.json`: package versions, devices, seed, git commit (if any), command line, start time;
- `metrics.jsonl`: one JSON object per line. `"kind": "train"` rows (every `log_every` steps):
  `step` (updates applied so far), `time` (training time t, the sum of step sizes), `loss` (the
  risk at those parameters), `grad_norm` (the L²(ν) norm of the mean-field gradient), `lr`,
  `wall_s`. `"kind": "eval"` rows (every `eval_every` steps and at the end): `w2` (the conditional
  Wasserstein distance W_{2,c} of the heads from their initial measure) and `w2_layers`, test
  metrics (`test_loss`, `test_accuracy` for classification), `wall_s`;
- `checkpoints/step_XXXXXXXX.eqx`: the training state (step, head particles, optimiser state,
  PRNG key), written atomically (temporary file + rename), the last `keep_checkpoints` kept;
- `figures/*.png`: loss (log scale), one layer's particles projected to 2-D at start and end,
  token trajectories through the initial and the trained transformer.

Everything a run computes is a function of the config: the initial heads and the task data are
rebuilt from the seed, and the batch of step k depends only on the PRNG key and k, so a run
resumed from a checkpoint ends bit-identical (on CPU) to an uninterrupted one.

**Several processes** (multi-host; the `distributed:` section or the `MEANFIELD_TF_*` environment,
see `meanfield_tf.distributed`): `train` first joins the processes into one JAX runtime, so the
`mesh:` spans every process's devices. Every process builds the same heads, task and batches (they
are functions of the config, the key and the step), runs the same steps and evaluations (they are
collectives), and gathers the state for a checkpoint (`gather_to_host`); only process 0 writes the
run directory, and the others wait at a barrier after each checkpoint. A resume reads the
checkpoint on every process (the run directory must be on a file system they all see) and
re-shards it on the current mesh.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import yaml

from ._errors import ConfigError, InputError
from ._heads import HeadMeasure
from .io import atomic_write
from ._sharding import gather_to_host  # checkpoints: the state on the host, all processes
from ._training import (
    MeanFieldGradient,
    TrainingDiverged,
    conditional_w2,
    gradient_flow_optimizer,
    make_train_step,
    set_learning_rate,
)
from .train_config import (
    DigitsTask,
    DistributionMatchingTask,
    InContextRegressionTask,
    TeacherStudentTask,
    TrainConfig,
    train_config_from_dict,
    train_config_to_dict,
)

CONFIG_FILE = "config.yaml"
MANIFEST_FILE = "manifest.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoints"
FIGURE_DIR = "figures"


# ---------------------------------------------------------------------------------------------
# The run directory


class TrainState(eqx.Module):
    """What a checkpoint holds: `step` (updates applied), the head particles, the optimiser state
    and the PRNG key the batches are drawn from."""

    step: jax.Array
    heads: HeadMeasure
    opt_state: Any
    key: jax.Array


class RunDir:
    """A run directory (see the module docstring for its layout)."""

    def __init__(self, path):
        self.path = Path(path)

    # -- files --------------------------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def metrics_path(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / CHECKPOINT_DIR

    @property
    def figure_dir(self) -> Path:
        return self.path / FIGURE_DIR

    def write_config(self, cfg: TrainConfig) -> None:
        # the process id is per process (the writer's would be wrong for the others on resume)
        cfg = dataclasses.replace(cfg, distributed=dataclasses.replace(cfg.distributed,
                                                                       process_id=None))
        text = yaml.safe_dump(train_config_to_dict(cfg), sort_keys=False).encode()
        atomic_write(self.config_path, lambda f: f.write(text))

    def read_config(self) -> TrainConfig:
        if not self.config_path.exists():
            raise InputError(f"{str(self.path)!r} is not a run directory (no {CONFIG_FILE}); give "
                             f"the directory a `meanfield-tf train` run wrote")
        data = yaml.safe_load(self.config_path.read_text())
        return train_config_from_dict(data)

    def write_manifest(self, cfg: TrainConfig, argv: list[str] | None = None) -> None:
        text = json.dumps(manifest(cfg, argv), indent=2).encode()
        atomic_write(self.path / MANIFEST_FILE, lambda f: f.write(text))

    # -- metrics ------------------------------------------------------------------------------
    def append_metrics(self, row: dict) -> None:
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()

    def read_metrics(self) -> list[dict]:
        if not self.metrics_path.exists():
            return []
        rows = []
        for line in self.metrics_path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a kill
                continue
        return rows

    def truncate_metrics(self, step: int) -> None:
        """Drop rows written after checkpoint `step` (train rows `>= step`, eval rows `> step`)."""
        keep = [r for r in self.read_metrics()
                if (r["step"] < step if r.get("kind") == "train" else r["step"] <= step)]
        text = "".join(json.dumps(r) + "\n" for r in keep).encode()
        atomic_write(self.metrics_path, lambda f: f.write(text))

    # -- checkpoints --------------------------------------------------------------------------
    def checkpoints(self) -> list[tuple[int, Path]]:
        """`(step, path)` of every complete checkpoint, oldest first."""
        if not self.checkpoint_dir.exists():
            return []
        out = []
        for p in self.checkpoint_dir.glob("step_*.eqx"):
            try:
                out.append((int(p.stem.split("_")[1]), p))
            except (IndexError, ValueError):
                continue
        return sorted(out)

    def save_checkpoint(self, state: TrainState, keep: int) -> Path:
        step = int(state.step)
        path = self.checkpoint_dir / f"step_{step:08d}.eqx"
        atomic_write(path, lambda f: eqx.tree_serialise_leaves(f, state))
        for _, old in self.checkpoints()[:-keep]:
            old.unlink(missing_ok=True)
        return path

    def load_checkpoint(self, like: TrainState) -> TrainState:
        ckpts = self.checkpoints()
        if not ckpts:
            raise InputError(f"run directory {str(self.path)!r} has no checkpoint to resume from")
        return eqx.tree_deserialise_leaves(ckpts[-1][1], like)


def _git_commit() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=5)
        if out.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def manifest(cfg: TrainConfig, argv: list[str] | None = None) -> dict:
    """Versions, devices (all processes), process count, seed, git commit and command line."""
    from importlib import metadata

    versions = {}
    for pkg in ("meanfield_tf", "jax", "jaxlib", "equinox", "diffrax", "optax", "ott-jax", "numpy",
                "scikit-learn"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return {
        "versions": versions,
        "python": platform.python_version(),
        "devices": [str(d) for d in jax.devices()],
        "processes": jax.process_count(),
        "coordinator": (cfg.distributed.resolve().coordinator_address
                        if jax.process_count() > 1 else None),
        "backend": jax.default_backend(),
        "x64": bool(jax.config.jax_enable_x64),
        "seed": cfg.seed,
        "git_commit": _git_commit(),
        "command": argv,
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


# ---------------------------------------------------------------------------------------------
# From a config to the objects of a run


class Forward(eqx.Module):
    """The depth solve of a run: `forward(heads, tokens) -> X_1` (and `trajectory`)."""

    solver: Any
    stepping: Any
    kernel: Any

    def __call__(self, heads, tokens):
        from ._flow import flow

        return flow(heads, tokens, solver=self.solver, stepping=self.stepping, kernel=self.kernel).x

    def trajectory(self, heads, tokens):
        from ._flow import flow

        sol = flow(heads, tokens, solver=self.solver, stepping=self.stepping, kernel=self.kernel)
        return sol.s, sol.xs


@dataclasses.dataclass
class Run:
    """Everything a run is built from its config: initial heads, task, gradient, optimiser."""

    cfg: TrainConfig
    dtype: Any
    heads0: HeadMeasure
    task: Any
    forward: Forward
    gradient: MeanFieldGradient
    optimizer: Any
    data_key: jax.Array
    step: Any = None  # the jitted training step (see `_training.make_train_step`)

    def initial_state(self) -> TrainState:
        # the optimiser object is shared between runs with the same settings (one compiled step):
        # the step size of *this* config goes into the state, as an injected hyperparameter
        opt_state = set_learning_rate(self.optimizer.init(self.heads0.params),
                                      self.cfg.train.learning_rate)
        return TrainState(step=jnp.asarray(0, jnp.int32), heads=self.heads0, opt_state=opt_state,
                          key=self.data_key)


def schedule_shape(train):
    """The step-size shape `count -> factor` of a `TrainSection` (None: constant)."""
    import optax

    main_steps = max(train.steps - train.warmup_steps, 1)
    shape = {
        "constant": None,
        "cosine": optax.cosine_decay_schedule(1.0, main_steps),
        "exponential": optax.exponential_decay(1.0, main_steps, train.decay_rate),
    }[train.schedule]
    if train.warmup_steps:
        warm = optax.linear_schedule(0.0, 1.0, train.warmup_steps)
        shape = optax.join_schedules([warm, shape or optax.constant_schedule(1.0)],
                                     [train.warmup_steps])
    return shape


def make_optimizer(train) -> Any:
    """The optax optimiser a `TrainSection` describes (see `gradient_flow_optimizer`)."""
    import optax

    base = {"sgd": None, "momentum": optax.trace(decay=train.momentum),
            "adam": optax.scale_by_adam()}[train.optimizer]
    return gradient_flow_optimizer(train.learning_rate, base=base, schedule=schedule_shape(train))


_STEP_CACHE: dict = {}


def _training_objects(cfg: TrainConfig):
    """`(forward, gradient, optimizer, step)` for a config, shared by every run of this process
    with the same solver, gradient and optimiser settings, so that the jitted step compiles once
    (runs that differ only in data, seed, lengths or cadence reuse it)."""
    tc = cfg.train
    key = (cfg.solver, cfg.heads.layers, tc.gradient, tc.optimizer, tc.momentum, tc.schedule,
           tc.warmup_steps, tc.decay_rate, tc.steps if tc.schedule != "constant" else None)
    if key not in _STEP_CACHE:
        forward, gradient = _solve_objects(cfg)
        optimizer = make_optimizer(tc)
        _STEP_CACHE[key] = (forward, gradient, optimizer, make_train_step(gradient, optimizer))
    forward, gradient, optimizer, step = _STEP_CACHE[key]
    return forward, gradient, optimizer, step


def _solve_objects(cfg: TrainConfig):
    from . import options
    from ._gradients import Autodiff, Backsolve, Explicit

    sc = cfg.solver
    try:
        solver = options.solver_from_name(sc.name)
        stepping = options.stepping_from_args(cfg.heads.layers, sc.steps, sc.rtol, sc.atol)
        kernel = options.kernel_from_name(sc.kernel, sc.chunk_size)
    except InputError as err:
        raise ConfigError(f"solver: {err}") from None
    forward = Forward(solver, stepping, kernel)
    method = {"autodiff": Autodiff(), "explicit": Explicit(), "backsolve": Backsolve()}[
        cfg.train.gradient]
    gradient = MeanFieldGradient(method=method, solver=solver, stepping=stepping, kernel=kernel)
    return forward, gradient


def build_run(cfg: TrainConfig) -> Run:
    """Build the initial heads, the task data and the training objects of `cfg` (deterministic)."""
    from . import options
    from .config import heads_from_config

    dtype = options.dtype_from_name(cfg.dtype)
    forward, gradient, optimizer, step = _training_objects(cfg)
    k_heads, k_task, k_data = jax.random.split(jax.random.PRNGKey(cfg.seed), 3)
    heads0 = heads_from_config(cfg.heads, k_heads, dtype)
    task = build_task(cfg, heads0, forward, k_task, dtype)
    return Run(cfg, dtype, heads0, task, forward, gradient, optimizer, k_data, step)


def build_task(cfg: TrainConfig, heads0: HeadMeasure, forward: Forward, key, dtype):
    """The `_tasks` object of `cfg.task`."""
    from . import _tasks
    from .config import families_from_config, heads_from_config, tokens_from_config
    from ._tokens import sample_tokens

    t = cfg.task
    if isinstance(t, TeacherStudentTask):
        k_tok, k_teacher = jax.random.split(key)
        tokens = tokens_from_config(t.tokens, k_tok, dtype)
        if tokens.dim != cfg.heads.dim:
            raise ConfigError(f"task.tokens families live in d={tokens.dim} but heads.dim is "
                              f"{cfg.heads.dim}; make them agree")
        if t.readout == "query":
            q = [0.5] * tokens.dim if t.query is None else t.query
            if len(q) != tokens.dim:
                raise ConfigError(f"task.query has {len(q)} coordinates, the tokens {tokens.dim}")
            tokens = tokens.append_query(jnp.asarray(q, dtype))
        xi = heads_from_config(dataclasses.replace(cfg.heads, init="gaussian"), k_teacher, dtype)
        teacher = _tasks.perturbed_heads(heads0, xi, t.perturbation)
        return _tasks.TeacherStudent.make(teacher, tokens, forward, readout=t.readout)
    if isinstance(t, InContextRegressionTask):
        return _tasks.InContextRegression(key, batch_size=t.batch_size, n=t.n, dim_x=t.dim_x,
                                          test_size=t.test_size, noise=t.noise, dtype=dtype)
    if isinstance(t, DigitsTask):
        try:
            return _tasks.Digits.load(batch_size=t.batch_size, test_fraction=t.test_fraction,
                                      split_seed=t.split_seed, query=t.query,
                                      ink_weights=t.ink_weights, dtype=dtype)
        except InputError as err:
            raise ConfigError(f"task: {err}") from None
    if isinstance(t, DistributionMatchingTask):
        k_tok, k_target = jax.random.split(key)
        tokens = tokens_from_config(t.tokens, k_tok, dtype)
        if tokens.dim != cfg.heads.dim:
            raise ConfigError(f"task.tokens families live in d={tokens.dim} but heads.dim is "
                              f"{cfg.heads.dim}; make them agree")
        fams = families_from_config(t.targets, dtype)
        try:
            targets = sample_tokens(k_target, fams, t.target_n)
        except InputError as err:
            raise ConfigError(f"task.targets: {err}") from None
        return _tasks.DistributionMatching.make(tokens, targets, t.epsilon)
    raise ConfigError(f"unknown task {t!r}")  # pragma: no cover


# ---------------------------------------------------------------------------------------------
# Evaluation


def evaluate(run: Run, heads: HeadMeasure) -> dict[str, Any]:
    """W_{2,c} from the initial heads and the test metrics (if the task has a test set)."""
    w2, layers = _w2(heads, run.heads0)
    out = {"w2": float(w2), "w2_layers": [float(v) for v in np.asarray(layers)]}
    test = run.task.test_batch()
    if test is not None:
        for k, v in _test_metrics(run.forward, heads, test).items():
            out[f"test_{k}"] = float(v)
    return out


@eqx.filter_jit
def _w2(heads, heads0):
    return conditional_w2(heads, heads0)


@eqx.filter_jit
def _test_metrics(forward, heads, batch):
    from ._tasks import evaluate_batch

    return evaluate_batch(batch, forward(heads, batch.tokens))


@eqx.filter_jit
def _trajectory(forward, heads, tokens):
    return forward.trajectory(heads, tokens)


@eqx.filter_jit
def _train_batch(task, key, step):
    return task.train_batch(key, step)


# ---------------------------------------------------------------------------------------------
# The training loop


class _Progress:
    """tqdm in a terminal, plain periodic lines otherwise."""

    def __init__(self, start: int, total: int, stream=None):
        self.stream = stream or sys.stderr
        self.total = total
        self.every = max(1, total // 10)
        self.bar = None
        if hasattr(self.stream, "isatty") and self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, file=self.stream, unit="step",
                            dynamic_ncols=True)

    def update(self, step: int, loss: float, extra: str = "") -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(f"loss {loss:.3e}" + (f" {extra}" if extra else ""), refresh=False)
        elif step % self.every == 0 or step == self.total:
            print(f"step {step}/{self.total}  loss {loss:.4e}" + (f"  {extra}" if extra else ""),
                  file=self.stream, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def train(cfg: TrainConfig, out, *, resume: bool = False, argv: list[str] | None = None,
          progress: bool = True, stream=None, figures: bool = True) -> dict[str, Any]:
    """Run (or resume) the training `cfg` describes in the run directory `out`.

    **Returns:** a summary dict (final step, loss, first loss, evaluation metrics, paths). Raises
    `TrainingDiverged` if the loss or the parameters become non-finite: the run stops, the last
    good checkpoint stays as it was.

    With several processes (`cfg.distributed` or the `MEANFIELD_TF_*` environment), call it on
    every process with the same arguments, before anything else touches a JAX device: it joins
    the processes first; only process 0 writes `out` (see the module docstring).
    """
    from .distributed import initialize_distributed

    initialize_distributed(cfg.distributed)  # before the first device query (no-op: one process)
    main = jax.process_index() == 0  # the only process that writes the run directory
    stream = stream or sys.stdout
    rd = RunDir(out)
    run = build_run(cfg)
    mesh = _run_mesh(cfg, run)  # `mesh:` section: shard heads x batch over devices (None: one)
    tc = cfg.train
    state = run.initial_state()
    if resume:
        state = rd.load_checkpoint(state)  # on every process
        state = eqx.tree_at(lambda s: s.opt_state, state,
                            set_learning_rate(state.opt_state, tc.learning_rate))
        if main:
            rd.truncate_metrics(int(state.step))
            rd.write_config(cfg)
    else:
        taken = False
        if main:
            rd.path.mkdir(parents=True, exist_ok=True)
            taken = bool(rd.checkpoints() or rd.metrics_path.exists())
        if _agree(taken):  # process 0's verdict, so that every process stops together
            raise InputError(f"run directory {str(rd.path)!r} already holds a run; resume it with "
                             f"`meanfield-tf resume {rd.path}` or choose another --out")
        if main:
            rd.write_config(cfg)
            rd.write_manifest(cfg, argv)
    step_fn = run.step
    traces_before = step_fn.num_traces()
    heads, opt_state, key = state.heads, state.opt_state, state.key
    if mesh is not None:
        heads, opt_state = _shard_run_state(heads, opt_state, mesh)
    start = int(state.step)
    total = tc.steps
    shape = schedule_shape(tc)
    t_wall = time.perf_counter()
    prior_wall = _prior_wall(rd) if resume and main else 0.0
    tau = _training_time_at(rd, start, shape) if resume and main else 0.0
    first_loss = None
    last_ckpt = rd.checkpoints()[-1][0] if rd.checkpoints() else None
    if start == 0:
        row = {"kind": "eval", "step": 0, **evaluate(run, heads), "wall_s": 0.0}
        if main:
            rd.append_metrics(row)
    bar = _Progress(start, total, stream=sys.stderr) if progress and main else None
    info = None
    try:
        for step in range(start, total):
            batch = _train_batch(run.task, key, jnp.asarray(step, jnp.int32))
            if mesh is not None:
                batch = _shard_run_batch(batch, cfg, mesh)
            heads, opt_state, info = step_fn(heads, opt_state, batch)
            loss = float(info.loss)
            gnorm = float(info.grad_norm)
            if not (np.isfinite(loss) and np.isfinite(gnorm)):
                where = (f"the last good checkpoint (step {last_ckpt}) is in {rd.checkpoint_dir}"
                         if last_ckpt is not None else "no checkpoint was written")
                raise TrainingDiverged(
                    f"the loss became {loss} (gradient norm {gnorm}) at step {step}; {where}; "
                    f"lower train.learning_rate or the head scales")
            if first_loss is None:
                first_loss = loss
            step_lr = float(opt_state.hyperparams["learning_rate"])
            factor = 1.0 if shape is None else float(shape(step))
            wall = prior_wall + time.perf_counter() - t_wall
            if main and (step % tc.log_every == 0 or step == total - 1):
                rd.append_metrics({"kind": "train", "step": step, "time": tau,
                                   "loss": loss, "grad_norm": gnorm,
                                   "lr": step_lr,
                                   "wall_s": round(wall, 4)})
            tau += step_lr * factor  # training time of the gradient flow after this step
            done = step + 1
            if bar is not None:
                bar.update(done, loss)
            if done % tc.eval_every == 0 or done == total:
                row = {"kind": "eval", "step": done, **evaluate(run, heads)}  # every process
                if main:
                    rd.append_metrics({**row, "wall_s": round(
                        prior_wall + time.perf_counter() - t_wall, 4)})
            if done % tc.checkpoint_every == 0 or done == total:
                # the whole state on every host (a collective when it spans several processes)
                host = gather_to_host(TrainState(jnp.asarray(done, state.step.dtype), heads,
                                                 opt_state, key))
                if not all(np.all(np.isfinite(a)) for a in jax.tree.leaves(host.heads.params)):
                    raise TrainingDiverged(
                        f"the head parameters became non-finite at step {done}; the last good "
                        f"checkpoint (step {last_ckpt}) is in {rd.checkpoint_dir}; lower "
                        f"train.learning_rate")
                if main:
                    rd.save_checkpoint(host, tc.keep_checkpoints)
                _barrier(f"checkpoint {done}")  # no process runs ahead of the written checkpoint
                last_ckpt = done
    finally:
        if bar is not None:
            bar.close()
    traces = step_fn.num_traces() - traces_before  # compilations during this run
    final_heads = gather_to_host(heads)  # every process (a collective)
    try:
        if figures and main:
            write_figures(rd, run, final_heads)
    except Exception as err:  # figures must never lose a finished run
        print(f"warning: could not draw the figures ({type(err).__name__}: {err})", file=sys.stderr)
    _barrier("end")  # the run directory is complete before any process returns
    summary = summarize(rd)
    summary["traces"] = traces
    return summary


def _training_time_at(rd: RunDir, start: int, shape) -> float:
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
    factors = (1.0 if shape is None else float(shape(j)) for j in range(last["step"], start))
    return float(last["time"]) + float(last["lr"]) * sum(factors)


def _prior_wall(rd: RunDir) -> float:
    rows = rd.read_metrics()
    return max((r.get("wall_s", 0.0) for r in rows), default=0.0)


def summarize(rd: RunDir) -> dict[str, Any]:
    """First and last train loss, last evaluation metrics, from `metrics.jsonl`."""
    rows = rd.read_metrics()
    train_rows = [r for r in rows if r.get("kind") == "train"]
    eval_rows = [r for r in rows if r.get("kind") == "eval"]
    out: dict[str, Any] = {"run_dir": str(rd.path)}
    if train_rows:
        out.update(first_loss=train_rows[0]["loss"], loss=train_rows[-1]["loss"],
                   step=train_rows[-1]["step"] + 1)
    if eval_rows:
        out.update({k: v for k, v in eval_rows[-1].items() if k not in ("kind", "w2_layers")})
        if eval_rows[0].get("test_accuracy") is not None:
            out["initial_test_accuracy"] = eval_rows[0]["test_accuracy"]
    return out


def load_run(path) -> tuple[RunDir, Run, TrainState]:
    """The run directory, its rebuilt `Run` and its last checkpointed state."""
    rd = RunDir(path)
    cfg = rd.read_config()
    run = build_run(cfg)
    state = rd.load_checkpoint(run.initial_state())
    return rd, run, state


def evaluate_run(path) -> dict[str, Any]:
    """Final metrics of a run from its last checkpoint: the training loss (on the batch of the
    checkpoint's step), the test metrics and the W_{2,c} distance travelled."""
    rd, run, state = load_run(path)
    step = int(state.step)
    batch = _train_batch(run.task, state.key, jnp.asarray(step, jnp.int32))
    # the training step with a zero step size: risk and gradient norm at the checkpoint, without
    # compiling anything new (the learning rate is an injected hyperparameter)
    _, _, info = run.step(state.heads, set_learning_rate(state.opt_state, 0.0), batch)
    out = {"step": step, "train_loss": float(info.loss), "grad_norm": float(info.grad_norm),
           **evaluate(run, state.heads)}
    text = json.dumps(out, indent=2).encode()
    atomic_write(rd.path / "eval.json", lambda f: f.write(text))
    return out


# ---------------------------------------------------------------------------------------------
# Figures


def write_figures(rd: RunDir, run: Run, heads: HeadMeasure) -> list[Path]:
    """Loss curve, particles of one layer at start and end, token trajectories."""
    from . import plots
    from ._training import _layer_particles

    rows = rd.read_metrics()
    train_rows = [r for r in rows if r.get("kind") == "train"]
    eval_rows = [r for r in rows if r.get("kind") == "eval"]
    paths = []
    paths.append(plots.plot_loss(
        rd.figure_dir / "loss.png", [r["step"] for r in train_rows], [r["loss"] for r in train_rows],
        eval_steps=[r["step"] for r in eval_rows],
        test_accuracy=[r.get("test_accuracy") for r in eval_rows],
        w2=[r["w2"] for r in eval_rows], title=f"{run.cfg.name}: {run.cfg.task.name}"))
    layer = 0
    p0 = np.asarray(_layer_particles(run.heads0)[layer])
    p1 = np.asarray(_layer_particles(heads)[layer])
    paths.append(plots.plot_particles(rd.figure_dir / "particles.png", p0, p1,
                                      title=f"layer {layer} head particles (PCA of θ)"))
    batch = run.task.test_batch() or _train_batch(run.task, run.data_key, jnp.asarray(0, jnp.int32))
    tokens = jax.tree.map(lambda a: a[:4], batch.tokens)
    for name, h in (("initial", run.heads0), ("trained", heads)):
        s, xs = _trajectory(run.forward, h, tokens)
        paths.append(plots.plot_trajectories(
            rd.figure_dir / f"tokens_{name}.png", xs, tokens.w, s,
            title=f"token trajectories, {name} heads"))
    return paths


# ---------------------------------------------------------------------------------------------
# Several processes (the `distributed:` section; see meanfield_tf.distributed, docs/scaling.md)


def _barrier(name: str) -> None:
    """Wait until every process gets here (nothing to wait for with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"meanfield_tf.run: {name}")


def _agree(flag: bool) -> bool:
    """Process 0's `flag`, on every process (a collective with several processes)."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(multihost_utils.broadcast_one_to_all(np.asarray(flag, np.int32)))


# ---------------------------------------------------------------------------------------------
# Sharding over a device mesh (the `mesh:` section; see meanfield_tf._sharding, docs/scaling.md)


def _run_mesh(cfg: TrainConfig, run: Run):
    """The `("heads", "data")` mesh of `cfg.mesh`, or `None` for a one-device run.

    Raises `ConfigError` if there are too few devices or `M` is not divisible by `mesh.heads`.
    """
    from ._sharding import make_mesh

    if not cfg.mesh.sharded:
        return None
    cfg.mesh.check(num_heads=run.heads0.num_heads)
    return make_mesh(heads=cfg.mesh.heads, data=cfg.mesh.data)


def _shard_run_state(heads: HeadMeasure, opt_state, mesh):
    """Head particles split over `heads`; the optimiser state split like them (per particle)."""
    from ._sharding import shard_heads, shard_like_heads

    return shard_heads(heads, mesh), shard_like_heads(opt_state, heads, mesh)


def _shard_run_batch(batch, cfg: TrainConfig, mesh):
    """A training batch split over `data` along its sequences (`ConfigError` if `B % D`)."""
    from ._sharding import shard_batch

    size = batch.tokens.batch_size
    cfg.mesh.check(batch_size=size)
    return shard_batch(batch, mesh, size)
