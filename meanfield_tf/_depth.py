r"""Integration in depth, one cell at a time.

Depth $[0, 1]$ is cut into the $L$ cells $[l/L, (l+1)/L]$ of a `HeadMeasure`. Every cell is one
`diffrax.diffeqsolve`, chained by a `lax.scan` over cells; the cell's parameters (left and right
ends) reach the vector field through diffrax's `args`, never a closure. Solving cell by cell means:

- every step respects the jumps of piecewise-constant parameters at $l/L$ (no step straddles a
  jump, and no solver stage ever evaluates another cell's parameters, not even at a step's end);
- explicit Euler with `FixedSteps(1)` is exactly the finite transformer;
- `diffrax.BacksolveAdjoint` solves each cell's backward adjoint ODE with that cell's own
  parameters.

Stepping is an object (`AbstractStepping`): `FixedSteps(k)` takes `k` equal steps per cell;
`AdaptiveSteps(rtol, atol)` uses a PID controller in every cell (first trial step: the whole
cell). Each builds its own diffrax step-size controller, first step and step budget, and
`solve_cell` is the one place a cell is solved (forwards by `integrate_depth`, backwards by the
explicit adjoint).
"""

from __future__ import annotations

import abc
from typing import Callable

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int, PyTree

from ._errors import InputError, SolverError
from ._heads import HeadMeasure, interpolate_cell
from ._sharding import constrain_like_heads


class AbstractStepping(eqx.Module):
    """How a depth cell is stepped: a diffrax step-size controller, the first step, a budget."""

    @abc.abstractmethod
    def controller(self) -> diffrax.AbstractStepSizeController:
        """The diffrax step-size controller of every cell."""

    @abc.abstractmethod
    def first_step(self, width: Array) -> Array:
        """The first (or only) step on a cell of the given width (negative: backwards)."""

    @abc.abstractmethod
    def max_steps(self) -> int:
        """The step budget of one cell (diffrax's `max_steps`)."""

    def check(self, solver: diffrax.AbstractSolver) -> None:
        """Raise `InputError` if `solver` cannot be stepped this way (default: any solver can)."""


class FixedSteps(AbstractStepping):
    """`steps_per_layer` equal steps in every depth cell (`ConstantStepSize`)."""

    steps_per_layer: int = eqx.field(static=True, default=1)

    def __check_init__(self):
        if int(self.steps_per_layer) < 1:
            raise InputError(f"steps_per_layer must be >= 1, got {self.steps_per_layer}")

    def controller(self):
        return diffrax.ConstantStepSize()

    def first_step(self, width):
        return width / self.steps_per_layer

    def max_steps(self):
        return self.steps_per_layer + 1


class AdaptiveSteps(AbstractStepping):
    """Error-controlled steps (`PIDController(rtol, atol)`) in every depth cell.

    `rtol` and `atol` are arrays, so changing them does not recompile.
    """

    rtol: Array = eqx.field(converter=jnp.asarray, default=1e-6)
    atol: Array = eqx.field(converter=jnp.asarray, default=1e-8)
    max_steps_per_layer: int = eqx.field(static=True, default=4096)

    def __check_init__(self):
        try:
            bad = not (float(self.rtol) > 0 and float(self.atol) > 0)  # NaN is bad too
        except Exception:  # traced tolerances: nothing to check
            bad = False
        if bad:
            raise InputError(f"rtol and atol must be > 0, got rtol={self.rtol}, atol={self.atol}")

    def controller(self):
        return diffrax.PIDController(rtol=self.rtol, atol=self.atol)

    def first_step(self, width):
        return width

    def max_steps(self):
        return self.max_steps_per_layer

    def check(self, solver):
        probe = diffrax.ODETerm(lambda t, y, a: y)
        if not isinstance(solver, diffrax.AbstractAdaptiveSolver) or solver.order(probe) is None:
            raise InputError(f"{type(solver).__name__} has no error estimate; use FixedSteps")


def raise_if_failed(converged) -> None:
    """Raise `SolverError` (outside `jit`) if any cell's flag in `converged` `(L,)` is False."""
    ok = np.asarray(converged)
    if not ok.all():
        bad = int(np.argmin(ok))
        raise SolverError(
            f"the depth solve failed in layer {bad} of {ok.size} (step-size controller hit "
            f"max_steps or produced non-finite values); raise max_steps_per_layer, loosen "
            f"rtol/atol, or use FixedSteps"
        )


class DepthSolution(eqx.Module):
    """What `integrate_depth` returns.

    - `ts`: saved depths `(T,)`; `ys`: states at those depths (leading axis `T`).
    - `y1`: the state at depth 1.
    - `num_steps`: accepted steps per cell `(L,)`; `converged`: per-cell success flags `(L,)`.
    """

    ts: Float[Array, " T"]
    ys: PyTree
    y1: PyTree
    num_steps: Int[Array, " L"]
    converged: Bool[Array, " L"]


def cell_edges(num_layers: int, dtype) -> tuple[Array, Array]:
    """Left and right ends `l/L`, `(l+1)/L` of every cell, in `dtype` (shared endpoints exact)."""
    edges = jnp.arange(num_layers + 1, dtype=dtype) / num_layers
    return edges[:-1], edges[1:]


class CellArgs(eqx.Module):
    """What a vector field receives as `args` inside cell `l`: parameters at both ends, the cell's
    left edge `s0`, `L`, and any extra data (e.g. token weights)."""

    left: PyTree
    right: PyTree | None  # None: piecewise-constant parameters on the cell
    s0: Array
    num_layers: int = eqx.field(static=True)
    extra: PyTree = None

    def params_at(self, s) -> dict[str, Array]:
        """θ(s) on this cell: the left particles (piecewise), or the linear interpolant."""
        if self.right is None:
            return self.left
        return interpolate_cell(self.left, self.right, (s - self.s0) * self.num_layers)


def cells(heads: HeadMeasure) -> tuple[PyTree, PyTree | None, Array, Array]:
    """`(left, right, s0, s1)` of every cell, stacked along a leading `L` axis (for `lax.scan`):
    the parameters at both ends (`right` is `None` for piecewise-constant heads) and the edges."""
    s0s, s1s = cell_edges(heads.num_layers, heads.dtype)
    left, right = heads.cells()
    return left, None if heads.interpolation == "piecewise" else right, s0s, s1s


def solve_cell(
    term: diffrax.AbstractTerm,
    solver: diffrax.AbstractSolver,
    stepping: AbstractStepping,
    start,
    end,
    y,
    args: CellArgs,
    *,
    saveat: diffrax.SaveAt,
    adjoint: diffrax.AbstractAdjoint = diffrax.RecursiveCheckpointAdjoint(),
) -> diffrax.Solution:
    """One cell's `diffeqsolve` from `start` to `end` (backwards when `end < start`), with the
    stepping's controller, first step and budget; a failure is reported in `result`, not raised."""
    return diffrax.diffeqsolve(
        term, solver, start, end, stepping.first_step(end - start), y, args, saveat=saveat,
        stepsize_controller=stepping.controller(), adjoint=adjoint,
        max_steps=stepping.max_steps(), throw=False,
    )


def integrate_depth(
    vector_field: Callable,
    y0: PyTree,
    heads: HeadMeasure,
    *,
    solver: diffrax.AbstractSolver,
    stepping: AbstractStepping,
    extra: PyTree = None,
    depths: Float[Array, " T"] | None = None,
    adjoint: diffrax.AbstractAdjoint = diffrax.RecursiveCheckpointAdjoint(),
) -> DepthSolution:
    """Solve `dy/ds = vector_field(s, y, CellArgs)` on `[0, 1]`, cell by cell.

    `depths=None` saves the state at every cell edge (`T = L + 1`, including `s = 0`); otherwise at
    the given sorted depths in `[0, 1]` (each cell saves the depths clipped into it; the cell that
    contains a depth provides it).
    """
    stepping.check(solver)
    # on a mesh, pin the head sharding: its transpose keeps gradients and Jacobians sharded too
    heads = constrain_like_heads(heads, heads)
    L = heads.num_layers
    left, right, s0s, s1s = cells(heads)
    term = diffrax.ODETerm(vector_field)
    if depths is not None:
        depths = jnp.asarray(depths, heads.dtype)

    def one_cell(y, cell):
        l_params, r_params, s0, s1 = cell
        args = CellArgs(l_params, r_params, s0, L, extra)
        ts = None if depths is None else jnp.clip(depths, s0, s1)
        sol = solve_cell(term, solver, stepping, s0, s1, y, args,
                         saveat=diffrax.SaveAt(ts=ts, t1=True), adjoint=adjoint)
        y_end = jax.tree.map(lambda a: a[-1], sol.ys)
        saves = None if depths is None else jax.tree.map(lambda a: a[:-1], sol.ys)
        ok = sol.result == diffrax.RESULTS.successful
        return y_end, (y_end if depths is None else saves, sol.stats["num_accepted_steps"], ok)

    y1, (saved, nsteps, ok) = jax.lax.scan(one_cell, y0, (left, right, s0s, s1s))
    if depths is None:
        ts = jnp.concatenate([s0s[:1], s1s])
        ys = jax.tree.map(lambda a0, a: jnp.concatenate([a0[None], a]), y0, saved)
    else:
        ts = depths
        cell = jnp.clip(jnp.floor(depths * L).astype(jnp.int32), 0, L - 1)
        idx = jnp.arange(depths.shape[0])
        ys = jax.tree.map(lambda a: a[cell, idx], saved)
    return DepthSolution(ts=ts, ys=ys, y1=y1, num_steps=nsteps, converged=ok)
