"""Shared test configuration: float64 everywhere unless a test asks for float32.

Correctness tests compare against independent references at rounding-level tolerances, which
needs float64. Tests of float32 behaviour build their arrays with an explicit dtype.
"""

import jax
import numpy as np
import pytest

jax.config.update("jax_enable_x64", True)


def tree_allclose(a, b, *, rtol, atol=0.0) -> bool:
    """True when every leaf of `a` matches `b` (same structure) within `rtol`/`atol`."""
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    if ta != tb:
        return False
    return all(np.allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol) for x, y in zip(la, lb))


def rel_err(a, b) -> float:
    """max |a - b| / max |b| over all entries."""
    a, b = np.asarray(a), np.asarray(b)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), np.finfo(b.dtype).tiny))


@pytest.fixture
def getkey():
    """Fresh, deterministic PRNG keys: `getkey()` returns a new key on each call."""
    state = {"key": jax.random.PRNGKey(0)}

    def _next():
        state["key"], sub = jax.random.split(state["key"])
        return sub

    return _next


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (for a jax.distributed coordinator)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_process_env(pid: int, port: int, devices_per_process: int = 2) -> dict:
    """The environment of process `pid` of a two-process CPU run on localhost."""
    import os

    env = dict(os.environ)
    env.update({
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices_per_process}",
        "JAX_PLATFORMS": "cpu",
        "MEANFIELD_TF_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
        "MEANFIELD_TF_NUM_PROCESSES": "2",
        "MEANFIELD_TF_PROCESS_ID": str(pid),
    })
    return env
