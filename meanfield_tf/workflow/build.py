"""Where names become objects: the one place that turns the words of a YAML config or of the
command line into library objects.

- `SOLVERS`, `KERNELS`, `GRADIENT_METHODS`, `ACTIVATIONS`: the name tables (the CLI's `choices`
  come from them);
- `depth_solver`: a `SolverConfig` (or the equivalent flags) → `DepthSolver`; `block_of`: the
  MLP units' `Block` of a `HeadsConfig`;
- `optimizer`: a `TrainSection` → `GradientFlowOptimizer`;
- `family`, `families`, `tokens`, `heads`: token families and the initial head measure;
- `task`: a training config → the task object (`TeacherStudent`, `InContextRegression`,
  `Digits`, `DistributionMatching`);
- `run`: a training config → a `Run` (every object of a training run, and its `TrainState`).

A new kernel, ODE method or gradient method is a class in the numerics plus one entry here.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .. import _tasks
from .._attention import ChunkedKernel, DenseKernel
from .._l2_attention import ChunkedL2Kernel, L2Kernel
from .._sinkhorn import ChunkedSinkhornKernel, SinkhornKernel
from .._cudnn_kernel import CudnnKernel
from .._depth import AdaptiveSteps, FixedSteps
from .._errors import ConfigError, InputError
from .._explicit import Explicit
from .._flow import flow
from .._geometry import Euclidean, Sphere
from .._gradients import Autodiff, Backsolve
from .._heads import HeadMeasure, gaussian_heads, symmetric_heads
from .._pallas_kernel import PallasKernel
from .._precision import PRECISIONS
from .._solvers import ClassicalRK4, DepthSolver
from .._units import GELU, Block, ReLU, Tanh, gaussian_units
from .._tokens import Discrete, Gaussian, GaussianMixture, UniformBall, UniformBox, sample_tokens
from .._training import (
    GradientFlowOptimizer,
    MeanFieldGradient,
    TrainStep,
    init_optimizer,
    make_train_step,
)
from .config import expand_copies
from .config.sections import HeadsConfig, SolverConfig, TokensConfig, family_specs_check
from .config.train import (
    DigitsTask,
    DistributionMatchingTask,
    InContextRegressionTask,
    TeacherStudentTask,
    TrainConfig,
    TrainSection,
)

SOLVERS = {
    "euler": diffrax.Euler,
    "heun": diffrax.Heun,
    "midpoint": diffrax.Midpoint,
    "ralston": diffrax.Ralston,
    "rk4": ClassicalRK4,
    "bosh3": diffrax.Bosh3,
    "tsit5": diffrax.Tsit5,
    "dopri5": diffrax.Dopri5,
    "dopri8": diffrax.Dopri8,
}
# name -> constructor from the chunk size, the precision policy, the causal mask and the Sinkhorn
# iterations (a kernel ignores the chunk size and iterations it has no use for; the causal mask
# and the precision policy are refused where they do not apply, see `kernel`)
KERNELS = {
    "dense": lambda c, precision, causal, k: DenseKernel(causal=causal),
    "chunked": lambda c, precision, causal, k: ChunkedKernel(c, causal=causal),
    "l2": lambda c, precision, causal, k: L2Kernel(causal=causal),
    "l2-chunked": lambda c, precision, causal, k: ChunkedL2Kernel(c, causal=causal),
    "sinkhorn": lambda c, precision, causal, k: SinkhornKernel(k),
    "sinkhorn-chunked": lambda c, precision, causal, k: ChunkedSinkhornKernel(k, c),
    "cudnn": lambda c, precision, causal, k: CudnnKernel(precision=precision),
    "pallas": lambda c, precision, causal, k: PallasKernel(precision=precision),
}
PRECISION_KERNELS = ("cudnn", "pallas")  # the kernels that take a precision policy
CAUSAL_KERNELS = ("dense", "chunked", "l2", "l2-chunked")  # the kernels that take a causal mask
GRADIENT_METHODS = {"autodiff": Autodiff, "backsolve": Backsolve, "explicit": Explicit}
ACTIVATIONS = {"tanh": Tanh, "relu": ReLU, "gelu": GELU}
DTYPES = ("float32", "float64")


def _choose(table: dict, name: str, what: str):
    if name not in table:
        raise InputError(f"unknown {what} {name!r}; choose one of {', '.join(table)}")
    return table[name]


def solver(name: str) -> diffrax.AbstractSolver:
    """A diffrax ODE solver from its name (`SOLVERS`)."""
    return _choose(SOLVERS, name.lower(), "solver")()


def kernel(name: str, chunk_size: int = 256, precision: str = "float32", causal: bool = False,
           sinkhorn_iterations: int = 3):
    """An attention kernel from its name (`KERNELS`), precision policy (`PRECISIONS`), causal
    mask and Sinkhorn iteration count."""
    make = _choose(KERNELS, name, "attention kernel")
    policy = _choose(PRECISIONS, precision, "precision")
    if precision != "float32" and name not in PRECISION_KERNELS:
        raise InputError(f"precision {precision} needs a kernel that takes a precision policy "
                         f"({', '.join(PRECISION_KERNELS)}); the {name} kernel computes in the "
                         f"input dtype: use --kernel pallas or cudnn, or precision float32")
    if causal and name not in CAUSAL_KERNELS:
        why = ("its column normalisation makes every key depend on all queries, future ones "
               "included" if name.startswith("sinkhorn") else "it has no mask")
        raise InputError(f"the causal mask is not offered by the {name} kernel ({why}); use one "
                         f"of {', '.join(CAUSAL_KERNELS)}, or causal false")
    return make(chunk_size, policy, causal, sinkhorn_iterations)


def gradient_method(name: str):
    """A gradient method from its name (`GRADIENT_METHODS`)."""
    return _choose(GRADIENT_METHODS, name, "gradient method")()


def stepping(num_layers: int, steps: int | None, rtol: float | None, atol: float | None):
    """`steps` (total, a multiple of L) → `FixedSteps(steps/L)`; `rtol`/`atol` → `AdaptiveSteps`;
    neither → `FixedSteps(1)`, one step per layer."""
    if steps is not None and (rtol is not None or atol is not None):
        raise InputError("give either --steps (fixed steps) or --rtol/--atol (adaptive), not both")
    if rtol is not None or atol is not None:
        return AdaptiveSteps(rtol=1e-6 if rtol is None else rtol, atol=1e-8 if atol is None else atol)
    if steps is None:
        return FixedSteps(1)
    if steps < 1 or steps % num_layers:
        raise InputError(
            f"--steps {steps} is not a positive multiple of the number of layers L={num_layers}; "
            f"steps must respect the layer jumps at l/L (use e.g. --steps {num_layers * 4})"
        )
    return FixedSteps(steps // num_layers)


def warn_tolerances(cfg: SolverConfig, dtype_name: str) -> None:
    """Warn when `rtol`/`atol` is below the resolution (machine epsilon) of `dtype_name`: the
    adaptive solver cannot meet it, and takes its maximum number of steps or fails."""
    import warnings

    eps = float(np.finfo(np.dtype(dtype_name)).eps)
    for name in ("rtol", "atol"):
        value = getattr(cfg, name)
        if value is not None and value < eps:
            warnings.warn(f"{name}={value:g} is below the resolution of {dtype_name} "
                          f"(machine epsilon {eps:.3g}): it cannot be met; raise it to at least "
                          f"{eps:.0e}" + (" or use --dtype float64" if dtype_name == "float32"
                                          else ""), UserWarning, stacklevel=2)


def depth_solver(cfg: SolverConfig, num_layers: int, block: Block = Block()) -> DepthSolver:
    """The `DepthSolver` a `SolverConfig` describes, for heads of `num_layers` layers, with the
    MLP `block` (`block_of(heads_cfg)`)."""
    return DepthSolver(solver(cfg.name), stepping(num_layers, cfg.steps, cfg.rtol, cfg.atol),
                       kernel(cfg.kernel, cfg.chunk_size, cfg.precision, cfg.causal,
                              cfg.sinkhorn_iterations), block,
                       geometry=Sphere() if cfg.sphere else Euclidean())


def block_of(cfg: HeadsConfig) -> Block:
    """The `Block` (activation, composition) of the MLP units a `HeadsConfig` describes."""
    return Block(_choose(ACTIVATIONS, cfg.activation, "activation")(), cfg.block)


def dtype(name: str):
    """The numpy dtype for `float32`/`float64`, enabling JAX's x64 mode for the latter."""
    if name == "float64":
        jax.config.update("jax_enable_x64", True)
        return np.float64
    if name == "float32":
        return np.float32
    raise InputError(f"unknown dtype {name!r}; choose float32 or float64")


def optimizer(train: TrainSection) -> GradientFlowOptimizer:
    """The optimiser a `TrainSection` describes (the learning rate goes into its state)."""
    shaped = train.schedule != "constant" or train.warmup_steps > 0
    # settings that do not change the compiled step are left at their defaults, so that runs
    # that differ only in them share one compiled training step
    return GradientFlowOptimizer(base=train.optimizer,
                                 momentum=train.momentum if train.optimizer == "momentum" else 0.9,
                                 schedule=train.schedule, steps=train.steps if shaped else 1,
                                 warmup_steps=train.warmup_steps,
                                 decay_rate=train.decay_rate if shaped else 0.1)


# ---------------------------------------------------------------------------------------------
# Token families and heads


def family(spec: dict, where: str = "family", dtype=None):
    """A `Discrete`/`Gaussian`/`GaussianMixture`/`UniformBox`/`UniformBall` from its spec."""
    family_specs_check(spec, where)
    dtype = dtype or jnp.result_type(float)
    a = {k: jnp.asarray(v, dtype) for k, v in spec.items() if k not in ("family", "copies")}
    make = {
        "gaussian": lambda: Gaussian(a["mean"], a["cov"]),
        "mixture": lambda: GaussianMixture(a["weights"], a["means"], a["covs"]),
        "box": lambda: UniformBox(a["low"], a["high"]),
        "ball": lambda: UniformBall(a["center"], a["radius"]),
        "discrete": lambda: Discrete(a["atoms"], a.get("weights")),
    }[spec["family"]]
    try:
        return make()
    except (InputError, TypeError, ValueError) as err:
        raise ConfigError(f"{where}: {err}") from None


def families(specs: list[dict], dtype=None, where: str = "tokens.families") -> list:
    """Every sequence's family from a list of specs (`copies: k` repeats a spec k times)."""
    built = {}
    out = []
    for i, spec in expand_copies(specs):
        if i not in built:
            built[i] = family(spec, f"{where}[{i}]", dtype)
        out.append(built[i])
    return out


def tokens(cfg: TokensConfig, key, dtype):
    """Sample the token batch a `TokensConfig` describes."""
    try:
        return sample_tokens(key, families(cfg.families, dtype), cfg.n)
    except InputError as err:
        raise ConfigError(f"tokens: {err}") from None


def heads(cfg: HeadsConfig, key, dtype) -> HeadMeasure:
    """Initialise the head measure a `HeadsConfig` describes."""
    common = dict(scale_A=cfg.scale_A, scale_V=cfg.scale_V, mean_A=cfg.mean_A, rank=cfg.rank,
                  interpolation=cfg.interpolation, dtype=dtype)
    if cfg.units:  # a key of its own: the heads are those of the same seed without units
        key, k_units = jax.random.split(key)
    if cfg.init == "gaussian":
        h = gaussian_heads(key, cfg.layers, cfg.heads, cfg.dim, mean_V=cfg.mean_V, **common)
    else:
        h = symmetric_heads(key, cfg.layers, cfg.heads, cfg.dim, **common)
    if not cfg.units:
        return h
    return h.with_units(**gaussian_units(
        k_units, cfg.layers, cfg.units, cfg.dim, scale_U=cfg.scale_U, scale_W=cfg.scale_W,
        scale_b=cfg.scale_b, symmetric=cfg.init == "symmetric", interpolation=cfg.interpolation,
        dtype=dtype))


# ---------------------------------------------------------------------------------------------
# Tasks


def _task_tokens(cfg: TrainConfig, tokens_cfg: TokensConfig, key, dtype):
    batch = tokens(tokens_cfg, key, dtype)
    if batch.dim != cfg.heads.dim:
        raise ConfigError(f"task.tokens families live in d={batch.dim} but heads.dim is "
                          f"{cfg.heads.dim}; make them agree")
    return batch


def teacher_heads(cfg: TrainConfig, heads0: HeadMeasure, key=None, dtype=None) -> HeadMeasure:
    """The teacher of a teacher-student config: `θ* = θ0 + perturbation · ξ`, ξ an independent
    draw of the initialisation. `key=None` derives it from the seed exactly as `run` does (so the
    figures can draw the teacher a run was trained against)."""
    if key is None:
        k_task = jax.random.split(jax.random.PRNGKey(cfg.seed), 3)[1]  # as in `run`
        key = jax.random.split(k_task)[1]  # as in `task`
    dtype = dtype or heads0.dtype
    xi = heads(dataclasses.replace(cfg.heads, init="gaussian"), key, dtype)
    return _tasks.perturbed_heads(heads0, xi, cfg.task.perturbation)


def task(cfg: TrainConfig, heads0: HeadMeasure, solve: DepthSolver, key, dtype):
    """The task object of `cfg.task` (teacher targets are computed with the depth solver
    `solve`)."""
    t = cfg.task
    if isinstance(t, TeacherStudentTask):
        k_tok, k_teacher = jax.random.split(key)
        batch = _task_tokens(cfg, t.tokens, k_tok, dtype)
        if t.readout == "query":
            q = [0.5] * batch.dim if t.query is None else t.query
            if len(q) != batch.dim:
                raise ConfigError(f"task.query has {len(q)} coordinates, the tokens {batch.dim}")
            batch = batch.append_query(jnp.asarray(q, dtype))
        teacher = teacher_heads(cfg, heads0, k_teacher, dtype)
        return _tasks.TeacherStudent.make(teacher, batch, lambda h, b: flow(h, b, solve).x,
                                          readout=t.readout)
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
        batch = _task_tokens(cfg, t.tokens, k_tok, dtype)
        try:
            targets = sample_tokens(k_target, families(t.targets, dtype, "task.targets"),
                                    t.target_n)
        except InputError as err:
            raise ConfigError(f"task.targets: {err}") from None
        return _tasks.DistributionMatching.make(batch, targets, t.epsilon)
    raise ConfigError(f"unknown task {t!r}")  # pragma: no cover


# ---------------------------------------------------------------------------------------------
# A training run


class TrainState(eqx.Module):
    """What a checkpoint holds: `step` (updates applied), the head particles, the optimiser state
    and the PRNG key the batches are drawn from."""

    step: jax.Array
    heads: HeadMeasure
    opt_state: Any
    key: jax.Array


@dataclasses.dataclass
class Run:
    """Everything a training run is built from its config: the initial heads, the task, the depth
    solver, the gradient, the optimiser and the jitted training step."""

    cfg: TrainConfig
    dtype: Any
    heads0: HeadMeasure
    task: Any
    solver: DepthSolver
    gradient: MeanFieldGradient
    optimizer: GradientFlowOptimizer
    step: TrainStep
    data_key: jax.Array

    def initial_state(self) -> TrainState:
        """Step 0: the initial heads, and the optimiser state with this config's step size."""
        opt_state = init_optimizer(self.optimizer, self.heads0, self.cfg.train.learning_rate)
        return TrainState(step=jnp.asarray(0, jnp.int32), heads=self.heads0, opt_state=opt_state,
                          key=self.data_key)

    def forward(self, heads: HeadMeasure, tokens):
        """The final tokens `X_1` of `tokens` through `heads` (this run's depth solver)."""
        return flow(heads, tokens, self.solver).x

    def batch(self, key, step: int):
        """The training batch of `step` (a pure function of the key and the step)."""
        return _train_batch(self.task, key, jnp.asarray(step, jnp.int32))

    def trajectory(self, heads: HeadMeasure, tokens):
        """`(s, xs)`: the tokens at every layer edge through `heads`."""
        return _trajectory(self.solver, heads, tokens)


@eqx.filter_jit
def _train_batch(task, key, step):
    return task.train_batch(key, step)


@eqx.filter_jit
def _trajectory(solver, heads, tokens):
    sol = flow(heads, tokens, solver)
    return sol.s, sol.xs


def run(cfg: TrainConfig) -> Run:
    """Build the initial heads, the task data and the training objects of `cfg` (deterministic:
    a function of the config and its seed). Runs with equal solver, gradient and optimiser
    settings share one compiled training step."""
    dt = dtype(cfg.dtype)
    warn_tolerances(cfg.solver, cfg.dtype)
    try:
        solve = depth_solver(cfg.solver, cfg.heads.layers, block_of(cfg.heads))
    except InputError as err:
        raise ConfigError(f"solver: {err}") from None
    gradient = MeanFieldGradient(method=gradient_method(cfg.train.gradient), solver=solve)
    opt = optimizer(cfg.train)
    k_heads, k_task, k_data = jax.random.split(jax.random.PRNGKey(cfg.seed), 3)
    heads0 = heads(cfg.heads, k_heads, dt)
    the_task = task(cfg, heads0, solve, k_task, dt)
    return Run(cfg, dt, heads0, the_task, solve, gradient, opt, make_train_step(gradient, opt),
               k_data)
