r"""Sharding: the head axis $M$ and the batch axis $B$ over a device mesh.

A run on several devices (GPUs, or hosts with `jax.distributed`) uses a two-axis mesh
`("heads", "data")` of shape `(H, D)`:

- **heads**: every head array of a `HeadMeasure` is `(L, M, ...)` (or `(L + 1, M, ...)`); axis 1
  is split into `H` blocks of `M / H` particles. The velocity is a head *average*,
  $v = \frac{1}{M}\sum_m a_{\theta_m}$, so each device computes the partial sum of its particles
  and one all-reduce over the `heads` axis completes it (inserted by XLA).
- **data**: the token batch `x (B, n, d)`, `w (B, n)` is split along `B` into `D` blocks. The
  sequences are coupled only through the heads, so the flow of a block needs no communication;
  the risk (a mean over sequences) and its gradient are reduced over `data` by XLA.

The optimiser update (optax) acts particle by particle, so optimiser state shaped like the head
parameters is sharded exactly like them and updated locally; scalars (step count, injected
learning rate) are replicated.

**How.** Inputs are placed with `jax.device_put(..., NamedSharding(mesh, spec))` on a mesh whose
axes are `AxisType.Auto` (the default `Explicit` axes of `jax.make_mesh` break diffrax), and
every jitted function of the library runs unchanged: XLA's sharding propagation partitions the
attention kernel over heads and sequences and inserts the reductions. Inside the library the head
sharding is also stated where it must hold (`constrain_like_heads`: the heads entering the depth
solve, and hence every gradient and Jacobian with respect to them, the mean-field gradients, the
updated parameters and the optimiser state), so that jitted results keep the heads'
`NamedSharding` on every JAX version (jax 0.12 no longer carries the mesh through
zero-initialised cotangents). The forward flow, its gradient and an optax step agree with the
single-device results to float64 round-off (`tests/test_sharding.py`).

On several hosts (processes), the mesh spans every process's devices; arrays are built from
host data that is identical on every process (`shard_heads` / `shard_tokens` accept NumPy or
single-device arrays) and gathered back with `gather_to_host`.
"""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec
from jaxtyping import PyTree

from ._errors import InputError
from ._heads import HeadMeasure
from ._tokens import TokenBatch

HEADS_AXIS = "heads"
DATA_AXIS = "data"


# ---------------------------------------------------------------------------------------------
# Mesh


def check_mesh_fits(heads: int, data: int, *, num_heads: int | None = None,
                    batch_size: int | None = None, num_devices: int | None = None) -> None:
    """Raise `InputError` unless a `(heads, data)` mesh fits the devices (`num_devices`, default
    every device of `jax.devices()`), and divides `M` (`num_heads`) and `B` (`batch_size`)."""
    _check_devices(heads, data, len(jax.devices()) if num_devices is None else num_devices)
    if num_heads is not None:
        _check_divides("heads", num_heads, heads)
    if batch_size is not None:
        _check_divides("data", batch_size, data)


def _check_devices(heads: int, data: int, available: int) -> None:
    need = heads * data
    if need > available:
        raise InputError(
            f"mesh heads={heads} x data={data} needs {need} devices but only {available} "
            f"{'is' if available == 1 else 'are'} available; use a smaller mesh, or more devices "
            f"(GPUs, hosts via jax.distributed, or XLA_FLAGS=--xla_force_host_platform_device_count"
            f"={need} on CPU)"
        )


def _check_divides(axis: str, size: int, shards: int) -> None:
    what = {"heads": ("number of heads M", "heads per layer"), "data": ("batch size B", "sequences")}
    name, unit = what[axis]
    if size % shards:
        raise InputError(
            f"{name}={size} is not divisible by mesh.{axis}={shards}; use a multiple of "
            f"{shards} {unit} or a mesh.{axis} that divides {size}"
        )


def make_mesh(heads: int = 1, data: int = 1, *, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A `("heads", "data")` device mesh of shape `(heads, data)` with `AxisType.Auto` axes.

    **Arguments:**

    - `heads`: number of shards of the head axis `M`.
    - `data`: number of shards of the batch axis `B`.
    - `devices`: the devices to use (default: the first `heads * data` of `jax.devices()`,
      all processes included).

    **Returns:** a `jax.sharding.Mesh`. Raises `InputError` if there are too few devices.
    """
    for name, value in (("heads", heads), ("data", data)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise InputError(f"mesh {name} must be an integer >= 1, got {value!r}")
    heads, data = int(heads), int(data)
    pool = list(jax.devices() if devices is None else devices)
    _check_devices(heads, data, len(pool))
    if devices is None and heads * data == len(pool):
        # let JAX order the devices for the physical topology
        return jax.make_mesh((heads, data), (HEADS_AXIS, DATA_AXIS),
                             axis_types=(AxisType.Auto, AxisType.Auto))
    grid = np.array(pool[: heads * data], dtype=object).reshape(heads, data)
    return Mesh(grid, (HEADS_AXIS, DATA_AXIS), axis_types=(AxisType.Auto, AxisType.Auto))


def _check_mesh(mesh) -> None:
    if not isinstance(mesh, Mesh) or set(mesh.axis_names) != {HEADS_AXIS, DATA_AXIS}:
        names = getattr(mesh, "axis_names", None)
        raise InputError(
            f"expected a mesh with axes ('heads', 'data') from meanfield_tf.make_mesh, got "
            f"{type(mesh).__name__} with axes {names}"
        )


# ---------------------------------------------------------------------------------------------
# Shardings


def heads_sharding(mesh: Mesh, ndim: int = 4) -> NamedSharding:
    """Sharding of one head array `(L, M, ...)`: axis 1 over `heads`, replicated over `data`."""
    return NamedSharding(mesh, PartitionSpec(None, HEADS_AXIS, *([None] * (ndim - 2))))


def batch_sharding(mesh: Mesh, ndim: int = 3) -> NamedSharding:
    """Sharding of one batch array `(B, ...)`: axis 0 over `data`, replicated over `heads`."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array."""
    return NamedSharding(mesh, PartitionSpec())


def _place(value, sharding: NamedSharding) -> jax.Array:
    """`value` laid out with `sharding`, also when the mesh spans several processes.

    Single process: `jax.device_put` (moves or re-shards). Several processes: a global array
    is re-sharded with `device_put`; host data (identical on every process) is cut with
    `jax.make_array_from_callback`, each process filling its own devices.
    """
    if isinstance(value, jax.Array) and (
        jax.process_count() == 1 or not value.is_fully_addressable
    ):
        return jax.device_put(value, sharding)
    host = np.asarray(value)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def shard_heads(heads: HeadMeasure, mesh: Mesh) -> HeadMeasure:
    """The head measure with every array split over the `heads` mesh axis (axis 1, `M`).

    Raises `InputError` unless `M` is divisible by the number of head shards.
    """
    _check_mesh(mesh)
    if not isinstance(heads, HeadMeasure):
        raise InputError(f"shard_heads expects a HeadMeasure, got {type(heads).__name__}")
    _check_divides("heads", heads.num_heads, mesh.shape[HEADS_AXIS])
    if heads.has_units and heads.num_units % mesh.shape[HEADS_AXIS]:  # split along M' alike
        raise InputError(f"number of MLP units M'={heads.num_units} is not divisible by "
                         f"mesh.heads={mesh.shape[HEADS_AXIS]}; use a multiple of it")
    return jax.tree.map(lambda a: _place(a, heads_sharding(mesh, np.ndim(a))), heads)


def shard_tokens(tokens: TokenBatch, mesh: Mesh) -> TokenBatch:
    """The token batch split over the `data` mesh axis (axis 0, `B`) for both `x` and `w`.

    Raises `InputError` unless `B` is divisible by the number of data shards.
    """
    _check_mesh(mesh)
    if not isinstance(tokens, TokenBatch):
        raise InputError(f"shard_tokens expects a TokenBatch, got {type(tokens).__name__}")
    _check_divides("data", tokens.batch_size, mesh.shape[DATA_AXIS])
    return jax.tree.map(lambda a: _place(a, batch_sharding(mesh, np.ndim(a))), tokens)


def shard_batch(batch: PyTree, mesh: Mesh, batch_size: int) -> PyTree:
    """A training batch (any pytree) placed on the mesh.

    `TokenBatch` nodes go through `shard_tokens`; other array leaves whose leading axis has length
    `batch_size` (per-sequence targets, labels) are split along it over `data`; every other
    array leaf (shared targets, a readout query token `(d,)`) is replicated.
    """
    _check_mesh(mesh)
    _check_divides("data", batch_size, mesh.shape[DATA_AXIS])

    def place(leaf):
        if isinstance(leaf, TokenBatch):
            return shard_tokens(leaf, mesh)
        if not _is_array(leaf):
            return leaf
        if np.ndim(leaf) >= 1 and np.shape(leaf)[0] == batch_size:
            return _place(leaf, batch_sharding(mesh, np.ndim(leaf)))
        return _place(leaf, replicated(mesh))

    return jax.tree.map(place, batch, is_leaf=lambda x: isinstance(x, TokenBatch))


def shard_like_heads(tree: PyTree, heads: HeadMeasure, mesh: Mesh) -> PyTree:
    """Place a pytree that holds head-shaped arrays (optimiser state, gradients) on the mesh.

    Array leaves with the shape of one of the head parameter arrays (momentum, Adam moments) are
    split over `heads` like the parameters; every other array leaf (step counts, injected
    hyperparameters) is replicated. Non-array leaves are left alone.
    """
    _check_mesh(mesh)
    _check_divides("heads", heads.num_heads, mesh.shape[HEADS_AXIS])
    shapes = {tuple(np.shape(a)) for a in jax.tree.leaves(heads)}

    def place(leaf):
        if not _is_array(leaf):
            return leaf
        if tuple(np.shape(leaf)) in shapes:
            return _place(leaf, heads_sharding(mesh, np.ndim(leaf)))
        return _place(leaf, replicated(mesh))

    return jax.tree.map(place, tree)


def _is_array(x) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic))


# ---------------------------------------------------------------------------------------------
# Inside jitted code: keep the head sharding explicit


def _heads_mesh(heads: HeadMeasure):
    """The abstract mesh the head arrays live on if it has an `Auto` `heads` axis, else None."""
    for leaf in jax.tree.leaves(heads):
        mesh = getattr(getattr(jax.typeof(leaf), "sharding", None), "mesh", None)
        if mesh is None or mesh.empty or HEADS_AXIS not in mesh.axis_names:
            continue
        kind = dict(zip(mesh.axis_names, mesh.axis_types))[HEADS_AXIS]
        return mesh if kind == AxisType.Auto else None
    return None


def constrain_like_heads(tree: PyTree, heads: HeadMeasure) -> PyTree:
    r"""`tree` with every head-shaped array leaf pinned to the head sharding of `heads`' mesh.

    Head-shaped means: the shape of one of the parameter arrays of `heads`, `(L, M, ...)` or
    `(L + 1, M, ...)` (parameters, mean-field gradients $g_{l,m}$, momentum and Adam moments);
    those leaves get `jax.lax.with_sharding_constraint` with `P(None, "heads", None, ...)` (axis
    `M` over the `heads` mesh axis) on the mesh the heads live on. Other leaves (step counts,
    injected hyperparameters, the risk) are returned unchanged.

    Use it inside traced code, on values that must stay sharded like the heads. With `Auto`
    mesh axes JAX tracks only the mesh of an array, not its partition, and newer JAX (0.12)
    drops even the mesh from zero-initialised cotangent accumulators (`zeros_like` inside an
    `Auto` mesh gives an array with no mesh; `add_any` keeps its first operand's). A gradient
    that has lost its mesh comes out of `jit` with a sharding recomputed from XLA's layout,
    which cannot name a mesh axis of size 1 (the heads of a `1 x D` mesh come back as
    `P()`), instead of the heads' own `NamedSharding`. The constraint puts the mesh back and
    tells XLA the layout the heads already have; values are unchanged.

    **Arguments:** `tree`, any pytree (a params dict, an optax state, a `HeadMeasure`);
    `heads`, the `HeadMeasure` whose mesh and parameter shapes decide.

    **Returns:** `tree` with the same structure.

    A no-op when the heads are on no mesh (one device), on a mesh without a `heads` axis or
    with an `Explicit` one (there the sharding is part of the type), and for leaves whose `M`
    is not divisible by the number of head shards. Differentiable: the transpose of the
    constraint constrains the cotangent the same way.
    """
    mesh = _heads_mesh(heads)
    if mesh is None:
        return tree
    shards = dict(zip(mesh.axis_names, mesh.axis_sizes))[HEADS_AXIS]
    shapes = {tuple(np.shape(a)) for a in jax.tree.leaves(heads)}

    def pin(leaf):
        shape = tuple(np.shape(leaf)) if _is_array(leaf) else None  # tracers are jax.Arrays
        if shape is None or shape not in shapes or shape[1] % shards:
            return leaf
        spec = PartitionSpec(None, HEADS_AXIS, *([None] * (len(shape) - 2)))
        return jax.lax.with_sharding_constraint(leaf, NamedSharding(mesh, spec))

    return jax.tree.map(pin, tree)


# ---------------------------------------------------------------------------------------------
# Back to the host (checkpoints)


def gather_to_host(tree: PyTree) -> PyTree:
    """Every array leaf as one NumPy array on the host, whatever its sharding.

    Single process: `np.asarray` (JAX assembles the shards). Several processes: arrays that span
    other processes' devices are all-gathered (`process_allgather`), so every process gets the
    full value; call it on every process (it is a collective). Use it before saving a
    checkpoint; re-shard after loading with `shard_heads` / `shard_like_heads` on any mesh.
    """

    def to_host(leaf):
        if isinstance(leaf, jax.Array):
            if leaf.is_fully_addressable:
                return np.asarray(leaf)
            from jax.experimental import multihost_utils

            return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))
        return leaf

    return jax.tree.map(to_host, tree)

