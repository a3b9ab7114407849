"""Multi-host runs: start `jax.distributed` from a config section or the environment.

One process runs per host (or per GPU); together they see one global list of devices
(`jax.devices()`), over which `meanfield_tf.make_mesh` lays the `("heads", "data")` mesh. Every
process runs the same program on the same host data; `shard_heads` / `shard_tokens` place each
process's part, `gather_to_host` assembles results (a collective: call it on every process).

Where the three numbers come from, first match wins, field by field:

1. the `DistributedConfig` (YAML section `distributed:`);
2. the environment: `MEANFIELD_TF_COORDINATOR_ADDRESS` (`host:port`; JAX's own
   `JAX_COORDINATOR_ADDRESS` is honoured as well), `MEANFIELD_TF_NUM_PROCESSES`,
   `MEANFIELD_TF_PROCESS_ID`;
3. JAX's cluster auto-detection (SLURM, Open MPI, Kubernetes, Cloud TPU), for whatever is
   still unset.

`initialize_distributed` must run before anything touches a JAX device. With the default
`DistributedConfig()` and none of the variables set it does nothing (one process), so a single
machine needs no configuration. On CPU the cross-process collectives use gloo.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Mapping, Optional

from ._errors import ConfigError

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
            _check_address(self.coordinator_address, "distributed.coordinator_address")
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


def _check_address(address: str, where: str) -> None:
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


@dataclasses.dataclass(frozen=True)
class ProcessInfo:
    """Where this process stands: its index, the process count, local and global device counts."""

    process_id: int
    num_processes: int
    local_devices: int
    global_devices: int
    distributed: bool

    @property
    def is_main(self) -> bool:
        """True on process 0: the one that writes run directories and logs."""
        return self.process_id == 0


def process_info() -> ProcessInfo:
    """The `ProcessInfo` of this process (starts the JAX backend)."""
    import jax

    return ProcessInfo(
        process_id=jax.process_index(), num_processes=jax.process_count(),
        local_devices=jax.local_device_count(), global_devices=jax.device_count(),
        distributed=jax.process_count() > 1,
    )


def initialize_distributed(config: DistributedConfig | None = None, *,
                           env: Mapping[str, str] | None = None) -> ProcessInfo:
    """Join the multi-process run described by `config` and the environment, if any.

    Calls `jax.distributed.initialize` (once; a second call is a no-op) with the resolved
    coordinator address, process count and process id; fields still unset are left to JAX's
    cluster auto-detection. Must run before any JAX computation. Raises `ConfigError` when the
    settings are inconsistent or the coordinator cannot be reached.

    **Returns:** this process's `ProcessInfo`.
    """
    import jax

    cfg = (config or DistributedConfig()).resolve(env)
    if cfg.enabled and not _already_initialized():
        if cfg.coordinator_address is not None:
            _check_address(cfg.coordinator_address, "the coordinator address")
        if (cfg.num_processes is not None and cfg.process_id is not None
                and cfg.process_id >= cfg.num_processes):
            raise ConfigError(
                f"process id {cfg.process_id} must be < number of processes {cfg.num_processes}"
            )
        jax.config.update("jax_cpu_collectives_implementation", cfg.cpu_collectives)
        try:
            jax.distributed.initialize(
                coordinator_address=cfg.coordinator_address,
                num_processes=cfg.num_processes,
                process_id=cfg.process_id,
                local_device_ids=cfg.local_device_ids,
                initialization_timeout=int(cfg.timeout_s),
            )
        except (ValueError, RuntimeError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ConfigError(
                f"could not start jax.distributed ({first}); set distributed.coordinator_address, "
                f"num_processes and process_id (or {ENV_COORDINATOR}, {ENV_NUM_PROCESSES}, "
                f"{ENV_PROCESS_ID}), or run under a cluster manager JAX detects (e.g. SLURM)"
            ) from None
    return process_info()


def _already_initialized() -> bool:
    import jax

    check = getattr(jax.distributed, "is_initialized", None)
    return bool(check()) if check is not None else False


def shutdown_distributed() -> None:
    """Leave the multi-process run (no-op when none was started)."""
    import jax

    if _already_initialized():
        jax.distributed.shutdown()
