"""The configuration sections shared by the commands, and the `simulate` and `ntk` configs.

Every section is a frozen dataclass validated on construction (`ConfigError` naming the key):
`TokensConfig` (sequences from analytic families), `HeadsConfig` (the initial head measure),
`SolverConfig` (the depth solver), `MeshConfig` (devices), `DistributedConfig` (joining a
multi-process run), and the whole configs of `meanfield-tf simulate` (`SimulateConfig`) and
`meanfield-tf ntk` (`NTKConfig`). The training config is in `train.py` beside this file.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Mapping, Optional

from ..._errors import ConfigError


def positive(where: str, value, allow_none=False):
    """Raise `ConfigError` unless `value` is finite and `> 0` (or `None` when allowed)."""
    if value is None and allow_none:
        return
    if value is None or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{where} must be > 0 and finite, got {value!r}")


def check_seed(value) -> None:
    """Raise `ConfigError` unless `value` is a PRNG seed (an integer in [0, 2^32))."""
    if not 0 <= value < 2**32:
        raise ConfigError(f"seed must be an integer in [0, 2^32), got {value!r}")


# ---------------------------------------------------------------------------------------------
# Token families

_FAMILY_KEYS = {
    "gaussian": ("mean", "cov"),
    "mixture": ("weights", "means", "covs"),
    "box": ("low", "high"),
    "ball": ("center", "radius"),
    "discrete": ("atoms", "weights"),
}
_OPTIONAL_KEYS = {"discrete": ("weights",)}


def family_specs_check(spec, where: str) -> None:
    """Raise ConfigError unless `spec` is a well-formed family spec (keys only, not values)."""
    if not isinstance(spec, dict) or "family" not in spec:
        raise ConfigError(f"{where} must be a mapping with a 'family' key ({', '.join(_FAMILY_KEYS)})")
    fam = spec["family"]
    if fam not in _FAMILY_KEYS:
        raise ConfigError(f"{where}.family {fam!r} is unknown; choose one of {', '.join(_FAMILY_KEYS)}")
    allowed = set(_FAMILY_KEYS[fam]) | {"family", "copies"}
    unknown = sorted(set(spec) - allowed)
    if unknown:
        raise ConfigError(
            f"unknown key {where}.{unknown[0]} for family {fam}; known keys: {', '.join(sorted(allowed))}"
        )
    missing = [k for k in _FAMILY_KEYS[fam] if k not in spec and k not in _OPTIONAL_KEYS.get(fam, ())]
    if missing:
        raise ConfigError(f"{where} (family {fam}) lacks key {missing[0]}")
    copies = spec.get("copies", 1)
    if isinstance(copies, bool) or not isinstance(copies, int) or copies < 1:
        raise ConfigError(f"{where}.copies must be a positive integer, got {copies!r}")


def expand_copies(specs: list[dict]) -> list[tuple[int, dict]]:
    """`(index in the list, spec)` once per sequence: a spec with `copies: k` appears k times."""
    return [(i, spec) for i, spec in enumerate(specs) for _ in range(spec.get("copies", 1))]




# ---------------------------------------------------------------------------------------------
# Sections


@dataclasses.dataclass(frozen=True)
class TokensConfig:
    """Token sequences drawn from analytic families.

    `families` is a list of specs, one per sequence, e.g. `{family: gaussian, mean: [0, 0],
    cov: [[1, 0], [0, 1]]}`; `copies: k` in a spec repeats it k times (independent samples).
    Families: gaussian (mean, cov), mixture (weights, means, covs), box (low, high),
    ball (center, radius), discrete (atoms, weights).
    """

    n: int = 32
    families: list[dict] = dataclasses.field(
        default_factory=lambda: [
            {"family": "gaussian", "mean": [0.0, 0.0], "cov": [[1.0, 0.0], [0.0, 1.0]], "copies": 4}
        ]
    )

    def __post_init__(self):
        positive("tokens.n", self.n)
        if not self.families:
            raise ConfigError("tokens.families must list at least one sequence family")
        for i, spec in enumerate(self.families):
            family_specs_check(spec, f"tokens.families[{i}]")


@dataclasses.dataclass(frozen=True)
class HeadsConfig:
    """The initial head measure: `layers` cells × `heads` particles in dimension `dim`; with
    `units: M'` > 0, also `M'` MLP units per cell (`activation` tanh | relu | gelu, composed with
    attention by `block`: sum | sequential), entries of `u`, `w` with scales `scale_U`, `scale_W`
    (over sqrt(d)) and biases with `scale_b`; `init: symmetric` pairs units as (u, w, b),
    (-u, w, b) too."""

    layers: int = 8
    heads: int = 16
    dim: int = 2
    init: str = "gaussian"  # gaussian | symmetric
    scale_A: float = 1.0
    scale_V: float = 1.0
    mean_A: float = 0.0  # A = mean_A I + noise
    mean_V: float = 0.0  # V = mean_V I + noise (gaussian init only)
    rank: Optional[int] = None  # factored heads (Q, K of rank k) when set
    interpolation: str = "piecewise"  # piecewise | linear
    units: int = 0  # M' MLP units per layer (0: attention only)
    activation: str = "tanh"  # a name of meanfield_tf.workflow.build.ACTIVATIONS
    block: str = "sum"  # sum | sequential: how the units compose with attention
    scale_U: float = 1.0
    scale_W: float = 1.0
    scale_b: float = 0.0

    def __post_init__(self):
        for name in ("layers", "heads", "dim"):
            positive(f"heads.{name}", getattr(self, name))
        self._check_units()
        positive("heads.rank", self.rank, allow_none=True)
        if self.init not in ("gaussian", "symmetric"):
            raise ConfigError(f"heads.init must be 'gaussian' or 'symmetric', got {self.init!r}")
        if self.init == "symmetric" and self.heads % 2:
            raise ConfigError(f"heads.init=symmetric needs an even heads count, got {self.heads}")
        if self.interpolation not in ("piecewise", "linear"):
            raise ConfigError(
                f"heads.interpolation must be 'piecewise' or 'linear', got {self.interpolation!r}"
            )
        if self.init == "symmetric" and self.mean_V:
            raise ConfigError("heads.mean_V must be 0 with init=symmetric (pairs (A, V), (A, -V))")
        if self.scale_A < 0 or self.scale_V < 0:
            raise ConfigError("heads.scale_A and heads.scale_V must be >= 0")

    def _check_units(self):
        from ..build import ACTIVATIONS

        if self.units < 0:
            raise ConfigError(f"heads.units must be >= 0 (0: no MLP units), got {self.units}")
        if self.init == "symmetric" and self.units % 2:
            raise ConfigError(f"heads.init=symmetric needs an even units count, got {self.units}")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"heads.activation must be one of {', '.join(ACTIVATIONS)}, got "
                              f"{self.activation!r}")
        if self.block not in ("sum", "sequential"):
            raise ConfigError(f"heads.block must be 'sum' or 'sequential', got {self.block!r}")
        for name in ("scale_U", "scale_W", "scale_b"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ConfigError(f"heads.{name} must be finite and >= 0, got {value!r}")


@dataclasses.dataclass(frozen=True)
class SolverConfig:
    """The depth solver: `name` (euler, heun, midpoint, rk4, tsit5, dopri5, ...), `steps` total
    fixed steps (a multiple of L; default L) or `rtol`/`atol` for adaptive steps; the kernel
    (the attention rule and its implementation), with its options: `causal` (token i attends to
    j <= i; dense, chunked, l2, l2-chunked) and `sinkhorn_iterations` (sinkhorn kernels; 1 is
    softmax); `sphere: true` keeps the tokens on the unit sphere (`Sphere()` geometry)."""

    name: str = "euler"
    steps: Optional[int] = None
    rtol: Optional[float] = None
    atol: Optional[float] = None
    kernel: str = "dense"  # a name of meanfield_tf.workflow.build.KERNELS
    chunk_size: int = 256
    precision: str = "float32"  # float32 | tf32 | bf16 (the cudnn and pallas kernels)
    sphere: bool = False  # tokens on the unit sphere (meanfield_tf.Sphere)
    causal: bool = False
    sinkhorn_iterations: int = 3

    def __post_init__(self):
        positive("solver.steps", self.steps, allow_none=True)
        positive("solver.sinkhorn_iterations", self.sinkhorn_iterations)
        positive("solver.rtol", self.rtol, allow_none=True)
        positive("solver.atol", self.atol, allow_none=True)
        positive("solver.chunk_size", self.chunk_size)
        from ..build import CAUSAL_KERNELS, KERNELS, PRECISIONS, SOLVERS

        if self.name not in SOLVERS:
            raise ConfigError(f"solver.name {self.name!r} is unknown; choose one of "
                              f"{', '.join(SOLVERS)}")
        if self.kernel not in KERNELS:
            raise ConfigError(f"solver.kernel must be one of {', '.join(KERNELS)}, got "
                              f"{self.kernel!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"solver.precision must be one of {', '.join(PRECISIONS)}, got "
                              f"{self.precision!r}")
        if not isinstance(self.causal, bool):
            raise ConfigError(f"solver.causal must be true or false, got {self.causal!r}")
        if self.causal and self.kernel not in CAUSAL_KERNELS:
            raise ConfigError(f"solver.causal needs a kernel with a causal mask "
                              f"({', '.join(CAUSAL_KERNELS)}), got kernel {self.kernel!r}")



@dataclasses.dataclass(frozen=True)
class SimulateConfig:
    """`meanfield-tf simulate --config`: tokens and heads generated from families with a seed."""

    seed: int = 0
    dtype: str = "float32"
    tokens: TokensConfig = dataclasses.field(default_factory=TokensConfig)
    heads: HeadsConfig = dataclasses.field(default_factory=HeadsConfig)
    solver: SolverConfig = dataclasses.field(default_factory=SolverConfig)
    num_saves: Optional[int] = None  # save at this many uniform depths (default: every layer edge)

    def __post_init__(self):
        check_seed(self.seed)
        if self.dtype not in ("float32", "float64"):
            raise ConfigError(f"dtype must be float32 or float64, got {self.dtype!r}")
        positive("num_saves", self.num_saves, allow_none=True)

@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """The device mesh of a run: `heads` shards of the head axis × `data` shards of the batch.

    `heads * data` devices are used (the first ones of `jax.devices()`, which spans every process
    in a multi-host run). The defaults `heads=1, data=1` mean one device, no sharding. As a YAML
    section: `mesh: {heads: 2, data: 4}`.
    """

    heads: int = 1
    data: int = 1

    def __post_init__(self):
        for name in ("heads", "data"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"mesh.{name} must be an integer >= 1 (number of shards), "
                                  f"got {value!r}")

    @property
    def num_devices(self) -> int:
        """The number of devices the mesh uses, `heads * data`."""
        return self.heads * self.data

    @property
    def sharded(self) -> bool:
        """Whether this mesh uses more than one device."""
        return self.heads * self.data > 1

    def check(self, *, num_heads: int | None = None, batch_size: int | None = None,
              num_devices: int | None = None) -> "MeshConfig":
        """Raise `ConfigError` unless the mesh fits the devices, `M` and `B`; return self."""
        from ..._errors import InputError
        from ..._sharding import check_mesh_fits

        try:
            check_mesh_fits(self.heads, self.data, num_heads=num_heads, batch_size=batch_size,
                            num_devices=num_devices)
        except InputError as err:
            raise ConfigError(str(err)) from None
        return self


# ---------------------------------------------------------------------------------------------
# Joining a multi-process run

ENV_COORDINATOR = "MEANFIELD_TF_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "MEANFIELD_TF_NUM_PROCESSES"
ENV_PROCESS_ID = "MEANFIELD_TF_PROCESS_ID"
_CPU_COLLECTIVES = ("gloo", "mpi")


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """How this process joins a multi-process run.

    - `enabled`: `None` (default) joins a multi-process run when a coordinator address or a
      process count is given here or in the environment, and stays single-process otherwise;
      `True` always calls `jax.distributed.initialize` (unset fields come from the environment or
      JAX's cluster auto-detection, e.g. under SLURM); `False` never does.
    - `coordinator_address`: `"host:port"` of process 0's coordinator service.
    - `num_processes`, `process_id`: the number of processes and this one's index in
      `[0, num_processes)`.
    - `local_device_ids`: the local devices this process uses (default: all of them).
    - `cpu_collectives`: cross-process collectives on CPU, `"gloo"` (default) or `"mpi"`.
    - `timeout_s`: how long to wait for every process to connect.
    """

    enabled: Optional[bool] = None
    coordinator_address: Optional[str] = None
    num_processes: Optional[int] = None
    process_id: Optional[int] = None
    local_device_ids: Optional[list[int]] = None
    cpu_collectives: str = "gloo"
    timeout_s: int = 300

    def __post_init__(self):
        if self.coordinator_address is not None:
            check_address(self.coordinator_address, "distributed.coordinator_address")
        if self.num_processes is not None and (
            isinstance(self.num_processes, bool) or self.num_processes < 1
        ):
            raise ConfigError(f"distributed.num_processes must be >= 1, got {self.num_processes!r}")
        if self.process_id is not None and self.process_id < 0:
            raise ConfigError(f"distributed.process_id must be >= 0, got {self.process_id!r}")
        if (self.num_processes is not None and self.process_id is not None
                and self.process_id >= self.num_processes):
            raise ConfigError(
                f"distributed.process_id={self.process_id} must be < num_processes="
                f"{self.num_processes} (processes are numbered from 0)"
            )
        if self.cpu_collectives not in _CPU_COLLECTIVES:
            raise ConfigError(
                f"distributed.cpu_collectives must be one of {_CPU_COLLECTIVES}, got "
                f"{self.cpu_collectives!r}"
            )
        if self.timeout_s <= 0:
            raise ConfigError(f"distributed.timeout_s must be > 0, got {self.timeout_s!r}")

    def resolve(self, env: Mapping[str, str] | None = None) -> "DistributedConfig":
        """This config with unset fields filled from the environment (`enabled` decided)."""
        env = os.environ if env is None else env
        address = self.coordinator_address or env.get(ENV_COORDINATOR) or env.get(
            "JAX_COORDINATOR_ADDRESS") or None
        nproc = self.num_processes
        if nproc is None and env.get(ENV_NUM_PROCESSES):
            nproc = _env_int(env, ENV_NUM_PROCESSES)
        pid = self.process_id
        if pid is None and env.get(ENV_PROCESS_ID):
            pid = _env_int(env, ENV_PROCESS_ID)
        enabled = self.enabled
        if enabled is None:
            enabled = address is not None or (nproc is not None and nproc > 1)
        return dataclasses.replace(self, enabled=enabled, coordinator_address=address,
                                   num_processes=nproc, process_id=pid)


def check_address(address: str, where: str) -> None:
    host, sep, port = str(address).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(
            f"{where} must look like host:port (e.g. 10.0.0.1:1234), got {address!r}"
        )


def _env_int(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise ConfigError(f"environment variable {name} must be an integer, got {env[name]!r}") from None

# ---------------------------------------------------------------------------------------------
# meanfield-tf ntk


@dataclasses.dataclass(frozen=True)
class NTKConfig:
    """The `ntk` command's YAML config.

    - `sequences`: one spec per sequence: `{family: gaussian, mean, cov}`,
      `{family: mixture, weights, means, covs}`, `{family: box, low, high}`,
      `{family: ball, center, radius}`, `{family: discrete, atoms, weights (optional)}`;
      `copies: k` repeats a spec.
    - `seed`: PRNG seed of the z samples and of the head sample.
    - `num_samples`: number of z samples S (LSE and Hessian tests; S distinct heads for the NTK).
    - `z_scale`: standard deviation of the z samples (moderate: about 1/spread of the tokens).
    - `num_heads`: M of the symmetric head sample (default 2 S).
    - `query`: the readout query token e (default (1,..,1)/sqrt(d)).
    - `safety`: the threshold's safety factor (threshold = safety x eps x sqrt(rows)).
    - `num_tokens`: if set, every continuous family is replaced by `num_tokens` sampled tokens and
      all tests certify those empirical sequences (the NTK then runs through the finite model).
    """

    sequences: list[dict] = dataclasses.field(default_factory=list)
    seed: int = 0
    num_samples: int = 512
    z_scale: float = 1.0
    num_heads: int | None = None
    query: list[float] | None = None
    safety: float = 100.0
    num_tokens: int | None = None

    def __post_init__(self):
        for name in ("num_samples", "z_scale", "safety"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if self.num_heads is not None and (self.num_heads < 2 or self.num_heads % 2):
            raise ConfigError(f"num_heads must be an even integer >= 2, got {self.num_heads}")
        if self.num_tokens is not None and self.num_tokens < 1:
            raise ConfigError(f"num_tokens must be a positive integer, got {self.num_tokens}")
