"""A TensorBoard copy of a run's metrics (`logging.tensorboard: true`).

Every row appended to `metrics.jsonl` is also written, scalar by scalar, into event files under
`RUN/tensorboard/` (tensorboardX, the optional extra `pip install 'meanfield-tf[tensorboard]'`):
the tag is `kind/key` (`train/loss`, `eval/test_loss`, `w2/w2`, `ntk/lambda_min`, ...), the
global step the row's `step`, and lists (`w2_layers`) are left out. `metrics.jsonl` stays the
record: a resume truncates it and appends a new event file, so the TensorBoard view of a
resumed run may show the steps it repeats twice. Only process 0 writes.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from .._errors import ConfigError

TENSORBOARD_DIR = "tensorboard"
EXTRA = "pip install 'meanfield-tf[tensorboard]'"


def missing_extra() -> str | None:
    """Why `logging.tensorboard: true` cannot run here (`None` when tensorboardX imports)."""
    if importlib.util.find_spec("tensorboardX") is None:
        return (f"logging.tensorboard: true needs tensorboardX, which is not installed; "
                f"{EXTRA} (or pip install tensorboardX), or set logging.tensorboard: false")
    return None


def scalars(row: dict) -> dict[str, float]:
    """The `kind/key` tags and values of a metrics row: every number except the step
    (booleans and lists are not scalars)."""
    kind = row.get("kind", "metrics")
    out = {}
    for key, value in row.items():
        if key in ("kind", "step") or isinstance(value, bool):
            continue
        if isinstance(value, (int, float)):
            out[f"{kind}/{key}"] = float(value)
    return out


class TensorBoardLog:
    """Writes metrics rows as TensorBoard scalars into `run_dir/tensorboard/`."""

    def __init__(self, run_dir):
        problem = missing_extra()
        if problem:
            raise ConfigError(problem)
        from tensorboardX import SummaryWriter

        self.path = Path(run_dir) / TENSORBOARD_DIR
        self._writer = SummaryWriter(logdir=str(self.path))

    def write(self, row: dict) -> None:
        step = int(row["step"])
        for tag, value in scalars(row).items():
            self._writer.add_scalar(tag, value, global_step=step)

    def close(self) -> None:
        self._writer.flush()
        self._writer.close()
