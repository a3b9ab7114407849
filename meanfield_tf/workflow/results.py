"""A finished (or stopped) run as data: `load_run(path)` and `export_heads`.

`load_run(path)` reads a run directory written by `meanfield-tf train` and returns a `RunResults`:

- `config`: the resolved `TrainConfig` (every default spelled out);
- `train`, `eval`, `w2`, `ntk`: the metrics rows of each kind as columns, `{name: np.ndarray}`
  (one entry per row; `nan` where a row lacks the column; `w2_layers` is `(rows, N)`; `ntk` is
  empty unless the run had `logging.ntk: true`);
- `steps`: the steps with a checkpoint on disk (0, the initial heads, is always available);
- `heads(step=None)`: the head measure at a kept checkpoint (default: the newest intact one),
  checksum verified.

`export_heads(run_dir, out, step=None)` writes those heads in the `.npz` format the `simulate`,
`grad` and `ntk` commands read (`A`, `V` or `Q`, `K`, `V`, each `(N, M, d, d)`), plus the keys
`interpolation` (a string: `piecewise` or `linear`; `simulate --heads` reads it, so the depth
interpolation of the run is matched without a flag), `step`, and `solver_flags` (the
`simulate` flags that reproduce the run's depth solve, e.g. `--solver euler --dtype float32`).
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any

import equinox as eqx
import numpy as np

from .._errors import InputError
from .._heads import HeadMeasure
from . import build
from .config import TrainConfig
from .files import save_npz_atomic
from .rundir import RunDir, _checksum_path


def _columns(rows: list[dict]) -> dict[str, np.ndarray]:
    """Rows of one kind → columns (`nan` where a row lacks a key; lists become 2-D arrays)."""
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k != "kind" and k not in keys]
    out = {}
    for k in keys:
        values = [r.get(k) for r in rows]
        if any(isinstance(v, list) for v in values):
            width = max(len(v) for v in values if isinstance(v, list))
            out[k] = np.array([v if isinstance(v, list) else [np.nan] * width for v in values],
                              dtype=float)
        elif k == "step":
            out[k] = np.array(values, dtype=np.int64)
        else:
            out[k] = np.array([np.nan if v is None else v for v in values], dtype=float)
    return out


class RunResults:
    """A run directory read back (see the module docstring). Build with `load_run(path)`."""

    def __init__(self, path):
        self.rundir = RunDir(path)
        self.path = self.rundir.path
        self.config: TrainConfig = self.rundir.read_config()
        rows = self.rundir.read_metrics()
        self.train = _columns([r for r in rows if r.get("kind") == "train"])
        self.eval = _columns([r for r in rows if r.get("kind") == "eval"])
        self.w2 = _columns([r for r in rows if r.get("kind") == "w2"])
        self.ntk = _columns([r for r in rows if r.get("kind") == "ntk"])
        self._run = None

    def __repr__(self) -> str:
        return (f"RunResults({str(self.path)!r}, name={self.config.name!r}, "
                f"task={self.config.task.name!r}, steps={self.steps})")

    @property
    def metrics(self) -> dict[str, dict[str, np.ndarray]]:
        """`{"train": columns, "eval": columns, "w2": columns, "ntk": columns}`."""
        return {"train": self.train, "eval": self.eval, "w2": self.w2, "ntk": self.ntk}

    @property
    def steps(self) -> list[int]:
        """Steps whose heads are available: 0 (the initial heads) and every kept checkpoint."""
        return sorted({0, *(s for s, _ in self.rundir.checkpoints())})

    @property
    def run(self) -> build.Run:
        """The run's objects rebuilt from its config (task data, solver, initial heads)."""
        if self._run is None:
            self._run = build.run(self.config)
        return self._run

    def heads(self, step: int | None = None) -> HeadMeasure:
        """The head measure after `step` updates (0: the initial heads; default: the newest
        intact checkpoint). `InputError` naming the available steps if `step` has no
        checkpoint, or if its checkpoint fails its checksum."""
        like = self.run.initial_state()
        if step == 0:
            return self.run.heads0
        if step is None:
            state, skipped = self.rundir.load_newest(like)
            if state is None:
                if skipped:
                    raise InputError(f"run {str(self.path)!r} has no intact checkpoint "
                                     f"({'; '.join(skipped)})")
                return self.run.heads0
            return state.heads
        found = dict(self.rundir.checkpoints())
        if step not in found:
            raise InputError(f"run {str(self.path)!r} has no checkpoint at step {step}; "
                             f"available steps: {', '.join(map(str, self.steps))}")
        path = found[step]
        data = path.read_bytes()
        check = _checksum_path(path)
        if check.exists() and check.read_text().strip() != hashlib.sha256(data).hexdigest():
            raise InputError(f"checkpoint {path.name} of {str(self.path)!r} fails its checksum "
                             f"(damaged); choose another step: {', '.join(map(str, self.steps))}")
        try:
            return eqx.tree_deserialise_leaves(io.BytesIO(data), like).heads
        except Exception as err:  # truncated or garbage
            raise InputError(f"checkpoint {path.name} of {str(self.path)!r} is unreadable "
                             f"({type(err).__name__}); choose another step") from None

    def forward(self, tokens, step: int | None = None):
        """The final tokens `X_1` of `tokens` through the heads of `step` (the run's solver)."""
        return self.run.forward(self.heads(step), tokens)

    def final(self) -> dict[str, Any]:
        """The last value of every scalar train and eval column (`train_*` / `eval_*` keys are
        not prefixed: eval columns win on a clash; `step` is the last train step + 1)."""
        out: dict[str, Any] = {}
        for cols in (self.train, self.eval):
            for k, v in cols.items():
                if v.ndim == 1 and len(v) and k not in ("kind",):
                    out[k] = v[-1].item()
        if len(self.train.get("step", [])):
            out["step"] = int(self.train["step"][-1]) + 1
        return out


def load_run(path) -> RunResults:
    """Read the run directory `path` (written by `meanfield-tf train`): its resolved config,
    metrics as NumPy columns, and its heads at any kept checkpoint (see `RunResults`).

    Example::

        r = meanfield_tf.load_run("runs/digits")
        r.config.train.learning_rate, r.train["loss"], r.eval["test_accuracy"], r.steps
        heads = r.heads()          # newest checkpoint; r.heads(0) are the initial heads
    """
    return RunResults(path)


def solver_flags(cfg: TrainConfig) -> str:
    """The `simulate`/`grad` flags that reproduce the depth solve of a run's config."""
    s = cfg.solver
    flags = [f"--solver {s.name}"]
    if s.steps is not None:
        flags.append(f"--steps {s.steps}")
    if s.rtol is not None:
        flags.append(f"--rtol {s.rtol:g}")
    if s.atol is not None:
        flags.append(f"--atol {s.atol:g}")
    if s.kernel != "dense":
        flags.append(f"--kernel {s.kernel} --chunk-size {s.chunk_size}")
    if s.sphere:
        flags.append("--sphere")
    if s.causal:
        flags.append("--causal")
    if s.kernel.startswith("sinkhorn"):
        flags.append(f"--sinkhorn-iterations {s.sinkhorn_iterations}")
    flags.append(f"--dtype {cfg.dtype}")
    return " ".join(flags)


def export_heads(run_dir, out, step: int | None = None) -> dict[str, Any]:
    """Write the heads of `run_dir` at `step` (default: newest checkpoint) to the `.npz` `out`
    (see the module docstring). Returns `{"path", "step", "interpolation", "solver_flags",
    "keys", "shape"}`."""
    r = load_run(run_dir)
    if step is None:
        state, _ = r.rundir.load_newest(r.run.initial_state())
        step = 0 if state is None else int(state.step)
    heads = r.heads(step)
    out = Path(out)
    arrays = {k: np.asarray(v) for k, v in heads.params.items()}
    flags = solver_flags(r.config)
    save_npz_atomic(out, **arrays, interpolation=np.array(heads.interpolation),
                    step=np.array(step), solver_flags=np.array(flags))
    return {"path": str(out), "step": step, "interpolation": heads.interpolation,
            "solver_flags": flags, "keys": sorted(arrays), "shape": arrays["V"].shape}
