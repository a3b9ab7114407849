"""Multi-host runs: start `jax.distributed` from a config section or the environment.

One process runs per host (or per GPU); together they see one global list of devices
(`jax.devices()`), over which `meanfield_tf.make_mesh` lays the `("heads", "data")` mesh. Every
process runs the same program on the same host data; `shard_heads` / `shard_tokens` place each
process's part, `gather_to_host` assembles results (a collective: call it on every process).

Where the three numbers come from, first match wins, field by field:

1. the `DistributedConfig` (YAML section `distributed:`, in `config/sections.py`);
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
from typing import Mapping

import jax
import numpy as np

from .._errors import ConfigError
from .._sharding import make_mesh, shard_batch, shard_heads, shard_like_heads
from .config.sections import (
    ENV_COORDINATOR,
    ENV_NUM_PROCESSES,
    ENV_PROCESS_ID,
    DistributedConfig,
    MeshConfig,
)

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
    cfg = (config or DistributedConfig()).resolve(env)  # validated, environment included
    if cfg.enabled and not _already_initialized():
        if cfg.coordinator_address is not None and cfg.process_id not in (None, 0):
            _wait_for_coordinator(cfg.coordinator_address, cfg.timeout_s)
        jax.config.update("jax_cpu_collectives_implementation", cfg.cpu_collectives)
        try:
            jax.distributed.initialize(
                coordinator_address=cfg.coordinator_address,
                num_processes=cfg.num_processes,
                process_id=cfg.process_id,
                local_device_ids=cfg.local_device_ids,
                initialization_timeout=int(cfg.timeout_s),
                # process 0 serves on the configured interface only, not on every interface
                coordinator_bind_address=(cfg.coordinator_address if cfg.process_id == 0
                                          else None),
            )
        except (ValueError, RuntimeError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ConfigError(
                f"could not start jax.distributed ({first}); set distributed.coordinator_address, "
                f"num_processes and process_id (or {ENV_COORDINATOR}, {ENV_NUM_PROCESSES}, "
                f"{ENV_PROCESS_ID}), or run under a cluster manager JAX detects (e.g. SLURM)"
            ) from None
    return process_info()


def quiet_native_stdout() -> None:
    """Send what native code writes to standard output to /dev/null, keeping Python's
    `sys.stdout` on the terminal: call it before joining a multi-process run.

    On CPU, gloo (the cross-process collectives) prints `[Gloo] Rank r is connected to 1 peer
    ranks...` to the C++ standard output of every process, several times, through the run's
    own report. This points file descriptor 1 at /dev/null and reopens `sys.stdout` on a
    duplicate of the original one, so Python's prints (the command's report) still reach the
    terminal. Standard error is left as it is: Python errors, tracebacks, and the native
    libraries' warnings and fatal errors all still reach the user.
    """
    import os
    import sys

    sys.stdout.flush()
    keep = os.dup(1)
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.close(null)
    old = sys.stdout
    sys.stdout = open(keep, "w", encoding=getattr(old, "encoding", None) or "utf-8",
                      errors=getattr(old, "errors", None) or "strict",
                      buffering=1 if getattr(old, "line_buffering", True) else -1)


def _wait_for_coordinator(address: str, timeout_s: float) -> None:
    """Wait until process 0's coordinator accepts connections; `ConfigError` naming the
    address after `timeout_s` (JAX itself would abort the process with a C++ stack trace)."""
    import socket
    import time

    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=2.0):
                return
        except OSError as err:
            if time.monotonic() >= deadline:
                raise ConfigError(
                    f"the coordinator {address} did not answer within {timeout_s:g} s "
                    f"({err.strerror or err}); start process 0 first, check the address and port, "
                    f"or raise distributed.timeout_s") from None
            time.sleep(0.5)


def _already_initialized() -> bool:
    check = getattr(jax.distributed, "is_initialized", None)
    return bool(check()) if check is not None else False


def barrier(name: str) -> None:
    """Wait until every process gets here (nothing to wait for with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"meanfield_tf: {name}")


def agree(flag: bool) -> bool:
    """Process 0's `flag`, on every process (a collective with several processes)."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(multihost_utils.broadcast_one_to_all(np.asarray(flag, np.int32)))


# ---------------------------------------------------------------------------------------------
# Sharding a run over a device mesh (the `mesh:` section; see docs/scaling.md)


def run_mesh(mesh_cfg: MeshConfig, num_heads: int):
    """The `("heads", "data")` mesh of a run, or `None` for a one-device run.

    Raises `ConfigError` if there are too few devices or `M` is not divisible by `mesh.heads`.
    """
    if not mesh_cfg.sharded:
        return None
    mesh_cfg.check(num_heads=num_heads)
    return make_mesh(heads=mesh_cfg.heads, data=mesh_cfg.data)


def shard_state(heads, opt_state, mesh):
    """Head particles split over `heads`; the optimiser state split like them (per particle)."""
    return shard_heads(heads, mesh), shard_like_heads(opt_state, heads, mesh)


def shard_run_batch(batch, mesh_cfg: MeshConfig, mesh):
    """A training batch split over `data` along its sequences (`ConfigError` if `B % D`)."""
    size = batch.tokens.batch_size
    mesh_cfg.check(batch_size=size)
    return shard_batch(batch, mesh, size)
