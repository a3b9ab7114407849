"""Configuration of `meanfield-tf train`: strict dataclasses read from YAML (see `strict.py`).

A training config has the sections

- `task`: what is learned; `task.name` picks the task and its own keys
  (`teacher_student`, `in_context_regression`, `digits`, `distribution_matching`);
- `heads`, `solver`: the initial head measure and the depth solver (shared with `simulate`);
- `train`: the gradient flow (steps, learning rate, optimiser, schedule) and the run's cadence
  (logging, evaluation, checkpoints);
- `logging` (optional): the NTK at checkpoints and a TensorBoard copy of the metrics;
- `mesh`, `distributed` (optional): sharding over devices, and how this process joins a
  multi-process (multi-host) run (see `docs/scaling.md`).

Unknown keys, wrong types and bad values raise a one-line `ConfigError` before anything runs.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Optional

from ..._errors import ConfigError
from .sections import (
    DistributedConfig,
    HeadsConfig,
    MeshConfig,
    SolverConfig,
    TokensConfig,
    expand_copies,
    family_specs_check,
)
from .sections import check_seed
from .sections import positive as _positive
from .strict import from_dict, load_config, to_dict


def _nonneg(where: str, value):
    if value is None or value < 0:
        raise ConfigError(f"{where} must be >= 0, got {value!r}")


def _default_sequences():
    # Gaussian sequences with different covariances: their LSE functions are quadratics that are
    # linearly independent modulo affine functions (an injective NTK).
    return [
        {"family": "gaussian", "mean": [0.0, 0.0], "cov": [[1.0, 0.0], [0.0, 0.3]]},
        {"family": "gaussian", "mean": [0.5, 0.0], "cov": [[0.4, 0.2], [0.2, 0.8]]},
        {"family": "gaussian", "mean": [0.0, -0.5], "cov": [[0.3, -0.1], [-0.1, 0.6]]},
        {"family": "gaussian", "mean": [-0.5, 0.5], "cov": [[0.8, 0.3], [0.3, 0.5]]},
    ]


# ---------------------------------------------------------------------------------------------
# Tasks


@dataclasses.dataclass(frozen=True)
class TeacherStudentTask:
    """Targets made by a teacher head measure near the initial one (a small initial loss).

    The teacher is the initial measure with every particle moved by `perturbation` times an
    independent draw of the initialisation (`θ* = θ0 + perturbation · ξ`). `readout: query` fits
    the final position of a readout query token `query` appended to every sequence;
    `readout: tokens` fits the final position of every token (token-wise regression).
    """

    name: str = "teacher_student"
    readout: str = "query"  # query | tokens
    perturbation: float = 0.2
    query: Optional[list[float]] = None  # default: (1/2, ..., 1/2)
    tokens: TokensConfig = dataclasses.field(
        default_factory=lambda: TokensConfig(n=16, families=_default_sequences())
    )

    def __post_init__(self):
        if self.readout not in ("query", "tokens"):
            raise ConfigError(f"task.readout must be 'query' or 'tokens', got {self.readout!r}")
        _positive("task.perturbation", self.perturbation)


@dataclasses.dataclass(frozen=True)
class InContextRegressionTask:
    """In-context linear regression: tokens `(x_k, <β, x_k>)` in `R^{dim_x + 1}` with
    `x_k ~ N(0, I)` and `β ~ N(0, I / dim_x)` per sequence; a query token `(x_q, 0)` (weight 0)
    is appended and the prediction is the last coordinate of its final position. Fresh sequences
    every step (`batch_size` of them); a fixed test set of `test_size` sequences."""

    name: str = "in_context_regression"
    dim_x: int = 2
    n: int = 16
    batch_size: int = 32
    test_size: int = 256
    noise: float = 0.0

    def __post_init__(self):
        for k in ("dim_x", "n", "batch_size", "test_size"):
            _positive(f"task.{k}", getattr(self, k))
        _nonneg("task.noise", self.noise)


@dataclasses.dataclass(frozen=True)
class DigitsTask:
    """scikit-learn's 8×8 digits: each image is a sequence of 64 pixel tokens
    `(row, column, intensity, 0, ..., 0)` in `R^{3 + 10}` (each scaled to [-1, 1]), with uniform
    weights or (`ink_weights: true`) weights proportional to the intensity; a readout query
    token is appended and the class logits are the last 10
    coordinates of its final position, trained by cross-entropy. Train/test split by
    `test_fraction` (stratified, seeded by `split_seed`); mini-batches of `batch_size`."""

    name: str = "digits"
    batch_size: int = 64
    test_fraction: float = 0.25
    split_seed: int = 0
    query: Optional[list[float]] = None  # default (0, 0, 1, 0, ..., 0): a bright central pixel
    ink_weights: bool = False  # token weights ∝ intensity (blank pixels become padding)

    def __post_init__(self):
        _positive("task.batch_size", self.batch_size)
        if not 0 < self.test_fraction < 1:
            raise ConfigError(f"task.test_fraction must be in (0, 1), got {self.test_fraction!r}")


@dataclasses.dataclass(frozen=True)
class DistributionMatchingTask:
    """Push input token measures onto target measures: the risk is the Sinkhorn divergence
    (ott-jax, entropic regularisation `epsilon`) between each output sequence and its target.
    `targets` lists one family spec per input sequence (same `copies` semantics as
    `tokens.families`), sampled with `target_n` points."""

    name: str = "distribution_matching"
    tokens: TokensConfig = dataclasses.field(
        default_factory=lambda: TokensConfig(
            n=32, families=[{"family": "gaussian", "mean": [0.0, 0.0],
                             "cov": [[1.0, 0.0], [0.0, 1.0]], "copies": 2}]
        )
    )
    targets: list[dict] = dataclasses.field(
        default_factory=lambda: [
            {"family": "gaussian", "mean": [1.0, 0.0], "cov": [[0.5, 0.0], [0.0, 1.5]]},
            {"family": "gaussian", "mean": [0.0, 1.0], "cov": [[1.5, 0.0], [0.0, 0.5]]},
        ]
    )
    target_n: int = 32
    epsilon: float = 0.05

    def __post_init__(self):
        _positive("task.target_n", self.target_n)
        _positive("task.epsilon", self.epsilon)
        for i, spec in enumerate(self.targets):
            family_specs_check(spec, f"task.targets[{i}]")
        n_in = len(expand_copies(self.tokens.families))
        n_out = len(expand_copies(self.targets))
        if n_in != n_out:
            raise ConfigError(
                f"task.targets describes {n_out} sequences but task.tokens.families {n_in}; "
                f"give one target family per input sequence"
            )


TASKS = {
    "teacher_student": TeacherStudentTask,
    "in_context_regression": InContextRegressionTask,
    "digits": DigitsTask,
    "distribution_matching": DistributionMatchingTask,
}


def task_from_dict(data) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"task must be a mapping with a 'name' ({', '.join(TASKS)}), got {data!r}")
    name = data.get("name", "teacher_student")
    if name not in TASKS:
        raise ConfigError(f"task.name {name!r} is unknown; choose one of {', '.join(TASKS)}")
    return from_dict(TASKS[name], data, "task")


# ---------------------------------------------------------------------------------------------
# The gradient flow and the run's cadence

OPTIMIZERS = ("sgd", "momentum", "adam")
SCHEDULES = ("constant", "cosine", "exponential")


@dataclasses.dataclass(frozen=True)
class TrainSection:
    """`steps` of the gradient flow with step size `learning_rate` (training time t = steps · lr).

    `optimizer`: `sgd` (explicit Euler of the conditional Wasserstein gradient flow; default),
    `momentum` (heavy ball, `momentum` decay) or `adam` — the last two leave the gradient-flow
    geometry. `schedule`: `constant`, `cosine` (decay to 0 over `steps`) or `exponential`
    (`decay_rate` per `steps`), after `warmup_steps` of linear warm-up. `gradient`: the
    mean-field gradient method (`autodiff`: exact gradient of the discretised model).

    Cadence: a metrics line every `log_every` steps, the distance W2,c of the heads from their
    start every `w2_every` steps (a `w2` row; cheap: one small optimal transport per layer),
    evaluation (W2 distance travelled, test
    metrics) every `eval_every`, a checkpoint every `checkpoint_every` (the last
    `keep_checkpoints` are kept). The loss is checked at every step: the run stops as diverged
    when it is NaN/inf or exceeds `divergence_factor` times the best loss so far, so that the
    last checkpoint is always a good one.
    """

    steps: int = 400
    learning_rate: float = 2.0
    optimizer: str = "sgd"
    momentum: float = 0.9
    schedule: str = "constant"
    warmup_steps: int = 0
    decay_rate: float = 0.1
    gradient: str = "autodiff"
    log_every: int = 5
    w2_every: int = 10
    eval_every: int = 100
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    divergence_factor: float = 1e4

    def __post_init__(self):
        _positive("train.steps", self.steps)
        _positive("train.learning_rate", self.learning_rate)
        for k in ("log_every", "w2_every", "eval_every", "checkpoint_every", "keep_checkpoints"):
            _positive(f"train.{k}", getattr(self, k))
        _positive("train.divergence_factor", self.divergence_factor)
        if self.divergence_factor <= 1:
            raise ConfigError(f"train.divergence_factor must be > 1 (a bound over the best loss), "
                              f"got {self.divergence_factor!r}")
        _nonneg("train.warmup_steps", self.warmup_steps)
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"train.optimizer must be one of {', '.join(OPTIMIZERS)}, got "
                              f"{self.optimizer!r}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"train.schedule must be one of {', '.join(SCHEDULES)}, got "
                              f"{self.schedule!r}")
        from ..build import GRADIENT_METHODS

        if self.gradient not in GRADIENT_METHODS:
            raise ConfigError(f"train.gradient must be one of {', '.join(GRADIENT_METHODS)}, got "
                              f"{self.gradient!r}")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"train.momentum must be in [0, 1), got {self.momentum!r}")
        if not 0 < self.decay_rate <= 1:
            raise ConfigError(f"train.decay_rate must be in (0, 1], got {self.decay_rate!r}")


@dataclasses.dataclass(frozen=True)
class LoggingSection:
    """What a run records beyond the metrics every run writes (see `docs/reliability.md`).

    `ntk`: the extreme eigenvalues of the NTK Gram (mean-field units) of the readout-query
    outputs at step 0 and at every checkpoint, as `"kind": "ntk"` rows of `metrics.jsonl`
    (`lambda_min`, `lambda_max`, `predicted_slope` = -2 lambda_min / N), drawn in `ntk.png` and as
    a predicted-rate line in `loss.png`. It applies to the readout-query regression tasks
    (teacher_student with `readout: query`, in_context_regression); other tasks skip it with a
    note. One Jacobian of B · d_out outputs per checkpoint: off by default.
    `tensorboard`: write the same scalars into `RUN/tensorboard/` (needs tensorboardX: `pip
    install 'meanfield-tf[tensorboard]'`); `metrics.jsonl` stays the record.
    """

    ntk: bool = False
    tensorboard: bool = False


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """`meanfield-tf train --config`: the whole run. `name` names the run directory
    (default: the config file's stem)."""

    name: Optional[str] = None
    seed: int = 0
    dtype: str = "float32"
    task: Any = dataclasses.field(default_factory=TeacherStudentTask)
    heads: HeadsConfig = dataclasses.field(
        default_factory=lambda: HeadsConfig(layers=4, heads=32, dim=2, init="gaussian")
    )
    solver: SolverConfig = dataclasses.field(default_factory=SolverConfig)
    train: TrainSection = dataclasses.field(default_factory=TrainSection)
    logging: LoggingSection = dataclasses.field(default_factory=LoggingSection)
    # sharding over devices: `mesh: {heads: H, data: D}` (see docs/scaling.md)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    # joining a multi-process run (jax.distributed; see docs/scaling.md)
    distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)

    def __post_init__(self):
        if not isinstance(self.task, tuple(TASKS.values())):
            object.__setattr__(self, "task", task_from_dict(self.task))
        check_seed(self.seed)
        if self.name is not None and (not self.name or "/" in self.name or "\\" in self.name
                                      or self.name in (".", "..")):
            raise ConfigError(f"name {self.name!r} must be a plain run name (no '/', not '..'): "
                              f"it names the run directory under runs/")
        if self.dtype not in ("float32", "float64"):
            raise ConfigError(f"dtype must be float32 or float64, got {self.dtype!r}")
        want = task_token_dim(self.task)
        if want is not None and want != self.heads.dim:
            raise ConfigError(
                f"task {self.task.name} has tokens in dimension {want} but heads.dim is "
                f"{self.heads.dim}; set heads.dim={want}"
            )
        adaptive = self.solver.rtol is not None or self.solver.atol is not None
        if self.train.gradient == "backsolve" and self.solver.name == "euler" and not adaptive:
            raise ConfigError(
                "train.gradient=backsolve with the constant-step euler solver is not the gradient "
                "of the simulated network; use train.gradient=autodiff or explicit, or an adaptive "
                "solver (solver.name=tsit5 solver.rtol=1e-6)"
            )
        rule = ("l2", "l2-chunked", "sinkhorn", "sinkhorn-chunked")
        if self.train.gradient == "explicit" and (self.solver.causal or self.solver.kernel in rule):
            raise ConfigError(
                f"train.gradient=explicit has the closed forms of plain softmax attention, not of "
                f"solver.kernel={self.solver.kernel}"
                f"{' with solver.causal' if self.solver.causal else ''}; use train.gradient=autodiff")


def task_token_dim(task) -> int | None:
    """The token dimension a task fixes (None when the token families decide it)."""
    if isinstance(task, InContextRegressionTask):
        return task.dim_x + 1
    if isinstance(task, DigitsTask):
        return 13
    return None


def load_train_config(path=None, overrides: list[str] | None = None) -> TrainConfig:
    """A `TrainConfig`: its defaults, an optional YAML file over them, then dotted overrides
    (`train.steps=200`). `name` defaults to the config file's stem."""
    cfg = load_config(TrainConfig, path, overrides)
    if cfg.name is None:
        name = Path(path).stem if path is not None else "teacher_student"
        cfg = dataclasses.replace(cfg, name=name)
    return cfg


def train_config_to_dict(cfg: TrainConfig) -> dict:
    """The resolved configuration (plain data; reading it back gives the same config)."""
    return to_dict(cfg)


def train_config_from_dict(data: dict) -> TrainConfig:
    """A `TrainConfig` from resolved plain data (e.g. a run directory's `config.yaml`)."""
    return from_dict(TrainConfig, data)


# The settings a resume may change: they continue the same experiment (its length, step size and
# schedule, cadence, and where it runs). Any other change makes a different experiment.
CONTINUATION = ("train.steps", "train.learning_rate", "train.schedule", "train.warmup_steps",
                "train.decay_rate", "train.log_every", "train.w2_every", "train.eval_every",
                "train.checkpoint_every", "train.keep_checkpoints", "train.divergence_factor",
                "logging.", "mesh.", "distributed.")


def _leaves(data, prefix=""):
    if isinstance(data, dict):
        for k, v in data.items():
            yield from _leaves(v, f"{prefix}{k}.")
    else:
        yield prefix[:-1], data


def continue_config(cfg: TrainConfig, overrides: list[str]) -> TrainConfig:
    """The config of a resumed run: `cfg` with `overrides`, which may change only the
    continuation settings (`CONTINUATION`); any other change is refused naming the key."""
    from .strict import apply_overrides

    new = train_config_from_dict(apply_overrides(train_config_to_dict(cfg), overrides))
    old = dict(_leaves(to_dict(cfg)))
    for key, value in _leaves(to_dict(new)):
        if old.get(key, value) != value and not key.startswith(CONTINUATION) and \
                key not in [c.rstrip(".") for c in CONTINUATION]:
            raise ConfigError(
                f"resume cannot change {key} ({old[key]!r} -> {value!r}): that makes a different "
                f"experiment; start a new run (meanfield-tf train --config ... {key}=...)")
    return new
