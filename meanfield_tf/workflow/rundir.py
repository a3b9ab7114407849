"""The run directory: its files, its manifest and its checkpoints.

A run directory holds

- `config.yaml`: the resolved configuration (every default spelled out; `resume` reads it back);
- `manifest.json`: package versions, devices, seed, git commit (if any), command line, start time;
- `metrics.jsonl`: one JSON object per line. `"kind": "train"` rows (every `log_every` steps):
  `step` (updates applied so far), `time` (training time t, the sum of step sizes), `loss` (the
  risk at those parameters), `grad_norm` (the L²(ν) norm of the mean-field gradient), `lr`,
  `wall_s`. `"kind": "eval"` rows (every `eval_every` steps and at the end): `w2` (the conditional
  Wasserstein distance W_{2,c} of the heads from their initial measure) and `w2_layers`, test
  metrics (`test_loss`, `test_accuracy` for classification), `wall_s`;
- `checkpoints/step_XXXXXXXX.eqx`: the training state (step, head particles, optimiser state,
  PRNG key), written atomically (temporary file + rename), the last `keep_checkpoints` kept;
- `figures/*.png`: loss (log scale), one layer's particles projected to 2-D at start and end,
  token trajectories through the initial and the trained transformer.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import platform
import subprocess
from pathlib import Path

import equinox as eqx
import jax
import yaml

from .._errors import InputError
from . import build
from .build import Run, TrainState
from .config import TrainConfig, train_config_from_dict, train_config_to_dict
from .files import atomic_write

CONFIG_FILE = "config.yaml"
MANIFEST_FILE = "manifest.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoints"
FIGURE_DIR = "figures"


# ---------------------------------------------------------------------------------------------
# The run directory


class RunDir:
    """A run directory (see the module docstring for its layout)."""

    def __init__(self, path):
        self.path = Path(path)

    # -- files --------------------------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def metrics_path(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / CHECKPOINT_DIR

    @property
    def figure_dir(self) -> Path:
        return self.path / FIGURE_DIR

    def write_config(self, cfg: TrainConfig) -> None:
        # the process id is per process (the writer's would be wrong for the others on resume)
        cfg = dataclasses.replace(cfg, distributed=dataclasses.replace(cfg.distributed,
                                                                       process_id=None))
        text = yaml.safe_dump(train_config_to_dict(cfg), sort_keys=False).encode()
        atomic_write(self.config_path, lambda f: f.write(text))

    def read_config(self) -> TrainConfig:
        if not self.config_path.exists():
            raise InputError(f"{str(self.path)!r} is not a run directory (no {CONFIG_FILE}); give "
                             f"the directory a `meanfield-tf train` run wrote")
        data = yaml.safe_load(self.config_path.read_text())
        return train_config_from_dict(data)

    def write_manifest(self, cfg: TrainConfig, argv: list[str] | None = None) -> None:
        text = json.dumps(manifest(cfg, argv), indent=2).encode()
        atomic_write(self.path / MANIFEST_FILE, lambda f: f.write(text))

    # -- metrics ------------------------------------------------------------------------------
    def append_metrics(self, row: dict) -> None:
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()

    def read_metrics(self) -> list[dict]:
        if not self.metrics_path.exists():
            return []
        rows = []
        for line in self.metrics_path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a kill
                continue
        return rows

    def truncate_metrics(self, step: int) -> None:
        """Drop rows written after checkpoint `step` (train rows `>= step`, eval rows `> step`)."""
        keep = [r for r in self.read_metrics()
                if (r["step"] < step if r.get("kind") == "train" else r["step"] <= step)]
        text = "".join(json.dumps(r) + "\n" for r in keep).encode()
        atomic_write(self.metrics_path, lambda f: f.write(text))

    # -- checkpoints --------------------------------------------------------------------------
    def checkpoints(self) -> list[tuple[int, Path]]:
        """`(step, path)` of every complete checkpoint, oldest first."""
        if not self.checkpoint_dir.exists():
            return []
        out = []
        for p in self.checkpoint_dir.glob("step_*.eqx"):
            try:
                out.append((int(p.stem.split("_")[1]), p))
            except (IndexError, ValueError):
                continue
        return sorted(out)

    def save_checkpoint(self, state: TrainState, keep: int) -> Path:
        step = int(state.step)
        path = self.checkpoint_dir / f"step_{step:08d}.eqx"
        atomic_write(path, lambda f: eqx.tree_serialise_leaves(f, state))
        for _, old in self.checkpoints()[:-keep]:
            old.unlink(missing_ok=True)
        return path

    def load_checkpoint(self, like: TrainState) -> TrainState:
        ckpts = self.checkpoints()
        if not ckpts:
            raise InputError(f"run directory {str(self.path)!r} has no checkpoint to resume from")
        return eqx.tree_deserialise_leaves(ckpts[-1][1], like)


def _git_commit() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=5)
        if out.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def manifest(cfg: TrainConfig, argv: list[str] | None = None) -> dict:
    """Versions, devices (all processes), process count, seed, git commit and command line."""
    from importlib import metadata

    versions = {}
    for pkg in ("meanfield_tf", "jax", "jaxlib", "equinox", "diffrax", "optax", "ott-jax", "numpy",
                "scikit-learn"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return {
        "versions": versions,
        "python": platform.python_version(),
        "devices": [str(d) for d in jax.devices()],
        "processes": jax.process_count(),
        "coordinator": (cfg.distributed.resolve().coordinator_address
                        if jax.process_count() > 1 else None),
        "backend": jax.default_backend(),
        "x64": bool(jax.config.jax_enable_x64),
        "seed": cfg.seed,
        "git_commit": _git_commit(),
        "command": argv,
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def load_run(path) -> tuple[RunDir, Run, TrainState]:
    """The run directory, its rebuilt `Run` and its last checkpointed state."""
    rd = RunDir(path)
    run = build.run(rd.read_config())
    return rd, run, rd.load_checkpoint(run.initial_state())
