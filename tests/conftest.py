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
