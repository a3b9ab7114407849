"""Evaluating a run: the distance travelled by the heads, test metrics, and run summaries.

- `evaluate(run, heads)`: the conditional Wasserstein distance W_{2,c} of `heads` from the run's
  initial heads (per layer too; `w2_units` for the MLP units, measured separately) and, if the task has a test set, its metrics (`test_loss`,
  `test_accuracy` for classification);
- `evaluate_run(path)`: the metrics of a run directory's last checkpoint (`meanfield-tf eval`);
- `summarize(rd)`: first and last loss, the loss averaged over the last 10% of logged steps,
  wall time and the last evaluation, from `metrics.jsonl`.
"""

from __future__ import annotations

import json
from typing import Any

import equinox as eqx
import numpy as np

from .._errors import InputError
from .._flow import flow
from .._heads import HeadMeasure
from .._tasks import evaluate_batch
from .._training import conditional_w2, set_learning_rate
from .build import Run
from .files import atomic_write
from .rundir import RunDir, load_run


def evaluate(run: Run, heads: HeadMeasure) -> dict[str, Any]:
    """W_{2,c} from the initial heads and the test metrics (if the task has a test set)."""
    w2, layers = _w2(heads, run.heads0, False)
    out = {"w2": float(w2), "w2_layers": [float(v) for v in np.asarray(layers)]}
    if heads.has_units:  # the MLP-unit family, measured on its own
        w2u, layers_u = _w2(heads, run.heads0, True)
        out.update(w2_units=float(w2u), w2_units_layers=[float(v) for v in np.asarray(layers_u)])
    test = run.task.test_batch()
    if test is not None:
        for k, v in _test_metrics(run.solver, heads, test).items():
            out[f"test_{k}"] = float(v)
    return out


def distance_travelled(run: Run, heads: HeadMeasure, *, units: bool = False) -> float:
    """W_{2,c} of `heads` from the run's initial heads (the `w2` rows of `metrics.jsonl`); with
    `units=True`, of the MLP-unit family (`w2_units`)."""
    return float(_w2(heads, run.heads0, units)[0])


@eqx.filter_jit
def _w2(heads, heads0, units):
    return conditional_w2(heads, heads0, units=units)


@eqx.filter_jit
def _test_metrics(solver, heads, batch):
    return evaluate_batch(batch, flow(heads, batch.tokens, solver).x)


def evaluate_run(path) -> dict[str, Any]:
    """Final metrics of a run from its last checkpoint: the training loss (on the batch of the
    checkpoint's step), the test metrics and the W_{2,c} distance travelled."""
    rd, run, state = load_run(path)
    step = int(state.step)
    batch = run.batch(state.key, step)
    # the training step with a zero step size: risk and gradient norm at the checkpoint, without
    # compiling anything new (the learning rate is an injected hyperparameter)
    _, _, info = run.step(state.heads, set_learning_rate(state.opt_state, 0.0), batch)
    out = {"step": step, "train_loss": float(info.loss), "grad_norm": float(info.grad_norm),
           "train_data": describe_train_data(run, step), **evaluate(run, state.heads)}
    test = run.task.test_batch()
    if test is not None:
        out["test_data"] = f"the fixed test set ({test.tokens.x.shape[0]} sequences)"
    text = json.dumps(out, indent=2).encode()
    try:
        atomic_write(rd.path / "eval.json", lambda f: f.write(text))
        out["written"] = str(rd.path / "eval.json")
    except (InputError, OSError):  # a read-only archived run is evaluated all the same
        out["written"] = None
    return out


def describe_train_data(run: Run, step: int) -> str:
    """Which data the training loss of `eval` is measured on (a full fixed batch, or the
    mini-batch the run would draw at `step`: it differs from the logged, smoothed loss)."""
    t = run.cfg.task
    if t.name in ("teacher_student", "distribution_matching"):
        return "the full training set (the fixed batch every step trains on)"
    return (f"the training mini-batch of step {step} ({t.batch_size} sequences; the logged loss "
            f"is over other mini-batches)")


def summarize(rd: RunDir) -> dict[str, Any]:
    """First and last train loss, last evaluation metrics, from `metrics.jsonl`."""
    rows = rd.read_metrics()
    train_rows = [r for r in rows if r.get("kind") == "train"]
    eval_rows = [r for r in rows if r.get("kind") == "eval"]
    out: dict[str, Any] = {"run_dir": str(rd.path)}
    if train_rows:
        tail = train_rows[-max(1, len(train_rows) // 10):]  # the last 10% of logged steps
        out.update(first_loss=train_rows[0]["loss"], loss=train_rows[-1]["loss"],
                   step=train_rows[-1]["step"] + 1,
                   smoothed_loss=float(np.mean([r["loss"] for r in tail])),
                   smoothed_over=[tail[0]["step"], tail[-1]["step"]],
                   wall_s=max(r.get("wall_s", 0.0) for r in rows))
    if eval_rows:
        out.update({k: v for k, v in eval_rows[-1].items()
                    if k not in ("kind", "w2_layers", "w2_units_layers", "wall_s")})
        if eval_rows[0].get("test_accuracy") is not None:
            out["initial_test_accuracy"] = eval_rows[0]["test_accuracy"]
    return out
