r"""Shared pieces of the training experiments (`convergence`, `width-depth`) and small helpers.

The training set-up of both experiments: $N$ sequences of $n$ tokens in $\mathbb{R}^d$, a readout
query $e$ appended with weight 0, the readout-query risk

$$R(\nu) = \frac1N \sum_i \tfrac12 |Y_i(\nu) - Y^*_i|^2, \qquad Y_i = \text{final position of } e,$$

a symmetric zero-velocity initialisation $\nu_0$ (`symmetric_heads`: the query does not move, so
$Y_i(\nu_0) = e$ for every $L, M$ and seed), and plain gradient descent on the mean-field
gradient $g = LM\,\partial R/\partial\theta$ (`MeanFieldGradient` + `gradient_flow_optimizer`,
explicit Euler of the flow with training-time step $\tau$).

**NTK units.** `ntk_blocks` returns $K = LM \sum_{l,m} \partial_\theta Y\, \partial_\theta Y^\top$.
Along the flow $d\theta_{lm}/dt = -g_{lm} = -LM\, \partial_{\theta_{lm}} R$, so
$dY/dt = \sum_{lm} \partial_{\theta_{lm}} Y\, d\theta_{lm}/dt = -K \nabla_Y R$ with
$\nabla_Y R = r / N$, $r = Y - Y^*$: the residual obeys $dr/dt = -K r / N$. Explicit Euler of it
is stable (monotone on every mode) when $\tau \lambda_{\max}(K) / N < 1$.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import meanfield_tf as mf

from ._common import mean_and_stderr, new_figure, save_figure


def enable_float64() -> None:
    """The training and certificate experiments run in float64 (rounding-level tests, loss decays
    over many orders of magnitude)."""
    jax.config.update("jax_enable_x64", True)


def mean_stderr(values) -> tuple[float, float]:
    """Mean and standard error of the mean (0 for one value), as floats."""
    mean, se = mean_and_stderr(values)
    return float(mean), float(se)


def readout_query(dim: int, dtype=jnp.float64):
    """The readout token $e = (1, .., 1)/\\sqrt d$."""
    return jnp.full((dim,), 1.0 / np.sqrt(dim), dtype)


def generic_sequences(key, num_sequences: int, num_tokens: int, dim: int, spread: float):
    """`num_sequences` uniform-weight sequences of `num_tokens` tokens $\\sim N(0, \\text{spread}^2 I)$."""
    x = spread * jax.random.normal(key, (num_sequences, num_tokens, dim), jnp.float64)
    return mf.TokenBatch(x)


def ntk_spectrum(heads: mf.HeadMeasure, tokens_q: mf.TokenBatch, solve_kwargs: dict):
    """The full readout-query NTK (mean-field units) of `heads` on `tokens_q` (query appended by
    the caller: `QueryOutputs` reads the last token)."""
    return mf.ntk_blocks(heads, tokens_q, output=mf.QueryOutputs(), **solve_kwargs)["full"]


def readout(heads: mf.HeadMeasure, tokens_q: mf.TokenBatch, solve_kwargs: dict):
    """$Y_i$: the final position of the last (query) token, `(N, d)`."""
    return mf.flow(heads, tokens_q, **solve_kwargs).x[:, -1]


@dataclasses.dataclass
class Trajectory:
    """A training run: `t` `(K+1,)` training times, `loss` `(K+1,)` the risk at those times
    (the last one after the final update), `path_length` $\\sum_k \\tau \\|g_k\\|_{L^2(\\nu)}$, and
    the head measures at the `snapshots` steps."""

    t: np.ndarray
    loss: np.ndarray
    path_length: float
    snapshots: dict[int, mf.HeadMeasure]
    heads: mf.HeadMeasure


class Trainer:
    """One jitted training step (`make_train_step` on `MeanFieldGradient` with the depth-solve
    options `solve_kwargs`, optimiser `gradient_flow_optimizer`) reused by every run of an
    experiment: the step size is the injected learning rate, so runs with different `tau` (and
    the same shapes) share one compilation. Also a jitted `conditional_w2`."""

    def __init__(self, solve_kwargs: dict):
        import equinox as eqx

        self.value_and_grad = mf.MeanFieldGradient(**solve_kwargs)
        self.optimizer = mf.gradient_flow_optimizer(jnp.asarray(1.0, jnp.float64))
        self.step = mf.make_train_step(self.value_and_grad, self.optimizer)
        self._loss = eqx.filter_jit(lambda h, b: self.value_and_grad(h, b)[0])
        self._w2 = eqx.filter_jit(lambda h, r: mf.conditional_w2(h, r)[0])

    def w2c(self, heads: mf.HeadMeasure, reference: mf.HeadMeasure) -> float:
        """$W_{2,c}(\\nu, \\nu')$ (`conditional_w2`, jitted)."""
        return float(self._w2(heads, reference))

    def train(self, heads: mf.HeadMeasure, batch: mf.Batch, *, tau: float, steps: int,
              snapshot_every: int = 0, progress: Callable[[str], None] | None = None,
              label: str = "") -> Trajectory:
        """`steps` steps of plain gradient descent on the mean-field gradient (explicit Euler of
        the flow, step `tau`). Snapshots of the heads every `snapshot_every` steps (and at the
        last one) when positive."""
        state = mf.set_learning_rate(self.optimizer.init(heads.params), tau)
        losses, norms, snaps = [], [], {}
        for k in range(steps):
            if snapshot_every and k % snapshot_every == 0:
                snaps[k] = heads
            heads, state, info = self.step(heads, state, batch)
            losses.append(info.loss)
            norms.append(info.grad_norm)
            if progress is not None and steps >= 100 and (k + 1) % (steps // 2) == 0:
                progress(f"{label} step {k + 1}/{steps} loss {float(info.loss):.3e}")
        losses.append(self._loss(heads, batch))
        if snapshot_every:
            snaps[steps] = heads
        loss = np.asarray(jnp.stack(losses), dtype=float)
        if not np.all(np.isfinite(loss)):
            raise mf.TrainingDiverged(f"{label}: the loss became non-finite; lower step_fraction")
        path = float(tau * np.sum(np.asarray(jnp.stack(norms), dtype=float)))
        return Trajectory(t=tau * np.arange(steps + 1), loss=loss, path_length=path,
                          snapshots=snaps, heads=heads)


def late_slope(t: np.ndarray, loss: np.ndarray) -> float:
    """Least-squares slope of $\\log R$ against $t$ over the last third of the run."""
    start = (2 * len(t)) // 3
    return float(np.polyfit(t[start:], np.log(loss[start:]), 1)[0])


def figure(width: float = 6.0, height: float = 4.0):
    """A small matplotlib figure (Agg backend): `_common.new_figure`."""
    return new_figure(width, height)


def save(fig, out: Path, name: str) -> Path:
    """Write `out/figures/name.png` and close the figure: `_common.save_figure`."""
    return save_figure(fig, out, f"{name}.png")
