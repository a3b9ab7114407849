"""`meanfield-tf simulate`: where the inputs of a forward flow come from, and what is reported.

Inputs are either `.npz` files of tokens and heads, or a `SimulateConfig` (tokens drawn from
analytic families and heads from an initialisation, with a seed), with the command line's solver
flags laid over either. `gaussian_errors` compares the empirical moments of simulated Gaussian
sequences with the exact Gaussian moment flow.
"""

from __future__ import annotations

import dataclasses

import diffrax
import jax
import jax.numpy as jnp
import numpy as np

from .._depth import FixedSteps
from .._errors import InputError
from .._flow import FlowSolution, flow
from .._gaussian import gaussian_flow
from .._heads import HeadMeasure
from .._solvers import DepthSolver
from .._tokens import Gaussian, TokenBatch
from . import build
from .config import SimulateConfig, load_config
from .files import load_heads, load_tokens


@dataclasses.dataclass
class Simulation:
    """A resolved `simulate` invocation: the config, heads, tokens, and (config inputs) the
    family of every sequence."""

    cfg: SimulateConfig
    heads: HeadMeasure
    tokens: TokenBatch
    families: list | None

    def run(self) -> FlowSolution:
        """The forward flow of the config's solver, checked for a failed solve."""
        solver = build.depth_solver(self.cfg.solver, self.heads.num_layers,
                                    build.block_of(self.cfg.heads))
        n = self.cfg.num_saves
        depths = None if n is None else jnp.linspace(0, 1, max(n, 2), dtype=self.heads.dtype)
        sol = flow(self.heads, self.tokens, solver, depths=depths).check()
        if not np.isfinite(np.asarray(sol.x)).all():
            raise InputError("the flow produced non-finite tokens (the heads are too large for "
                             "this solver/step); reduce the head scales or use more steps")
        return sol


def resolve(*, tokens_path=None, heads_path=None, config_path=None, overrides=(),
            interpolation=None, flags: dict | None = None) -> Simulation:
    """The `Simulation` of the command line's inputs. `flags` holds the solver and output flags
    (`dtype`, `num_saves`, `name`, `steps`, `rtol`, `atol`, `kernel`, `chunk_size`; `None` means
    not given) laid over the config."""
    if config_path is None and (tokens_path is None or heads_path is None):
        if tokens_path or heads_path:
            raise InputError("give both --tokens and --heads, or --config")
        cfg = load_config(SimulateConfig, None, list(overrides))  # built-in default
    elif config_path is not None:
        if tokens_path or heads_path:
            raise InputError("give either --config or --tokens/--heads, not both")
        cfg = load_config(SimulateConfig, config_path, list(overrides))
    else:
        if overrides:
            raise InputError("KEY=VALUE overrides apply to --config only")
        cfg = SimulateConfig()
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    top = {k: flags.pop(k) for k in ("dtype", "num_saves") if k in flags}
    cfg = dataclasses.replace(cfg, **top, solver=dataclasses.replace(cfg.solver, **flags))
    dtype = build.dtype(cfg.dtype)
    build.warn_tolerances(cfg.solver, cfg.dtype)
    if tokens_path is not None:
        tokens = load_tokens(tokens_path, dtype)
        heads = load_heads(heads_path, dtype, interpolation=interpolation)
        return Simulation(cfg, heads, tokens, None)
    key_t, key_h = jax.random.split(jax.random.PRNGKey(cfg.seed))
    return Simulation(cfg, build.heads(cfg.heads, key_h, dtype),
                      build.tokens(cfg.tokens, key_t, dtype),
                      build.families(cfg.tokens.families, dtype))


def gaussian_errors(sim: Simulation, sol: FlowSolution) -> list[tuple[int, float, float, float,
                                                                      float]]:
    """`(sequence, mean error at s=0, at s=1, covariance error at s=0, at s=1)` for every
    Gaussian sequence: the distance of the simulated tokens' empirical moments to the exact
    Gaussian moment flow of the simulation's attention rule (the s = 0 column is the sampling
    error, falling like n^-1/2)."""
    if sim.families is None or not any(isinstance(f, Gaussian) for f in sim.families):
        raise InputError("--gaussian-exact needs --config with at least one gaussian family")
    w = np.asarray(sim.tokens.w)
    xs = np.asarray(sol.xs)
    kernel = build.depth_solver(sim.cfg.solver, sim.heads.num_layers).kernel
    exact = DepthSolver(diffrax.Tsit5(), FixedSteps(8), kernel)  # gaussian_flow's default + rule
    rows = []
    for b, fam in enumerate(sim.families):
        if not isinstance(fam, Gaussian):
            continue
        g = gaussian_flow(sim.heads, fam.mean, fam.cov, exact)
        errs = []
        for t in (0, -1):
            xt = xs[t, b]
            m = (w[b, :, None] * xt).sum(0)
            c = ((xt - m).T * w[b]) @ (xt - m)
            errs.append((np.linalg.norm(m - np.asarray(g.mean[t])),
                         np.linalg.norm(c - np.asarray(g.cov[t]))))
        (m0, c0), (m1, c1) = errs
        rows.append((b, float(m0), float(m1), float(c0), float(c1)))
    return rows
