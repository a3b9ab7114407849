r"""The NTK along a training run (`logging.ntk: true`): its extreme eigenvalues at checkpoints,
the rate they predict, and the figure.

For a readout-query regression task the risk is $R = \frac1N\sum_i \tfrac12|P x^i_e(1) - y_i|^2$
on $N$ sequences; the NTK of the outputs $Y_i = P x^i_e(1)$ in mean-field units
(`ntk_blocks(..., output=QueryOutputs(P))["full"]`) governs it: $dR/dt \le
-2\lambda_{\min}(K) R/N$ under the gradient flow, so $\log R$ falls at least at the rate
`predicted_slope` $= -2\lambda_{\min}(K_0)/N$ (training time $\tau = \sum$ lr) while
$\lambda_{\min}$ stays above its initial value, and at that rate once the slowest mode dominates:
the quantity the `convergence` experiment calls `predicted_slope`.

- teacher–student with `readout: query`: the fixed training batch ($N$ = its sequences);
- in-context regression: the training batch of step 0 ($N$ = `batch_size`), fixed along the run
  so that the values are comparable; the run trains on fresh batches, for which the full-batch
  rate is no prediction: `loss.png` draws no line;
- other tasks (token regression, cross-entropy, Sinkhorn divergence) have no readout-query
  regression NTK: `probe` says why in one line.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from .._ntk import QueryOutputs, ntk_blocks, predicted_slope
from .._risks import QueryRegression
from .._tasks import InContextRegression, TeacherStudent


@dataclasses.dataclass(frozen=True)
class NTKProbe:
    """The fixed batch the NTK of a run is measured on, and whether the loss figure draws the
    predicted rate (a full-batch run trained by plain gradient descent)."""

    batch: object
    solver: object
    draw_rate: bool

    @property
    def num_sequences(self) -> int:
        return int(self.batch.tokens.batch_size)

    def measure(self, heads) -> dict:
        """`lambda_min`, `lambda_max`, `predicted_slope` (-2 λ_min / N) and `num_sequences` of
        the NTK at `heads` (a host copy: nothing here is a collective)."""
        risk = self.batch.risk
        spec = ntk_blocks(heads, self.batch.tokens, output=QueryOutputs(risk.readout),
                          solver=self.solver)["full"]
        lmin, lmax = float(spec.lambda_min), float(spec.lambda_max)
        return {"lambda_min": lmin, "lambda_max": lmax,
                "predicted_slope": float(predicted_slope(lmin, self.num_sequences)),
                "num_sequences": self.num_sequences}


def probe(run) -> tuple[NTKProbe | None, str]:
    """`(NTKProbe, "")` for a readout-query regression run, else `(None, why)`."""
    task, name = run.task, run.cfg.task.name
    if isinstance(task, TeacherStudent) and isinstance(task.batch.risk, QueryRegression):
        return NTKProbe(task.batch, run.solver, run.cfg.train.optimizer == "sgd"), ""
    if isinstance(task, InContextRegression):
        return NTKProbe(run.batch(run.data_key, 0), run.solver, False), ""
    what = {"teacher_student": "token-wise regression (readout: tokens)",
            "digits": "a cross-entropy classification", "distribution_matching":
            "a Sinkhorn divergence between token measures"}.get(name, name)
    return None, (f"logging.ntk skipped: task {name} is {what}, not a readout-query regression, "
                  f"whose NTK rate is defined")


def rate_line(rows: list[dict]) -> tuple[np.ndarray, np.ndarray, float] | None:
    """The predicted-rate line of `loss.png`: `(tau, loss, slope)` with
    $\\log R(\\tau) = \\log R(\\tau_0) + $ `slope` $(\\tau - \\tau_0)$ over the logged training
    times from the first NTK row's $\\tau_0$ on, `slope` its `predicted_slope`; `None` without NTK
    or training rows."""
    ntk = [r for r in rows if r.get("kind") == "ntk"]
    train = [r for r in rows if r.get("kind") == "train"]
    if not ntk or not train:
        return None
    first = min(ntk, key=lambda r: r["step"])
    tau = np.array([r["time"] for r in train], float)
    loss = np.array([r["loss"] for r in train], float)
    t0 = float(first["time"])
    keep = tau >= t0
    if keep.sum() < 2 or not np.isfinite(loss[keep][0]) or loss[keep][0] <= 0:
        return None
    slope = float(first["predicted_slope"])
    r0 = float(np.interp(t0, tau, loss))
    return tau[keep], r0 * np.exp(slope * (tau[keep] - t0)), slope


def plot_run_ntk(path, run, rows) -> Path:
    """`ntk.png`: λ_min and λ_max of the NTK (mean-field units) against training time τ, the
    predicted slope at the first row in the title."""
    from .figures import _pyplot, _save

    plt = _pyplot()
    ntk = sorted((r for r in rows if r.get("kind") == "ntk"), key=lambda r: r["step"])
    tau = np.array([r["time"] for r in ntk], float)
    lmin = np.array([r["lambda_min"] for r in ntk], float)
    lmax = np.array([r["lambda_max"] for r in ntk], float)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.semilogy(tau, lmax, "o-", ms=4, color="C1", label="λ_max(K)")
    ax.semilogy(tau, np.where(lmin > 0, lmin, np.nan), "o-", ms=4, color="C0", label="λ_min(K)")
    ax.set_xlabel("training time τ = Σ lr")
    ax.set_ylabel("NTK eigenvalue (mean-field units)")
    n = ntk[0]["num_sequences"] if ntk else 0
    ax.set_title(f"readout NTK on N = {n} sequences; "
                 f"predicted slope of log R at τ = 0: {ntk[0]['predicted_slope']:.3g}"
                 if ntk else "readout NTK", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.suptitle(f"{run.cfg.name}: NTK at the checkpoints")
    return _save(plt, fig, path)
