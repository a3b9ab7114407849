"""The run directory: its files, its manifest and its checkpoints.

A run directory holds

- `config.yaml`: the resolved configuration (every default spelled out; `resume` reads it back);
- `manifest.json`: package versions, devices, seed, git commit (if any), command line, start time;
- `metrics.jsonl`: one JSON object per line. `"kind": "train"` rows (every `log_every` steps):
  `step` (updates applied so far), `time` (training time t, the sum of step sizes), `loss` (the
  risk at those parameters), `grad_norm` (the L²(ν) norm of the mean-field gradient), `lr`
  (the step taken: the learning rate times the schedule's factor), `learning_rate` (the base
  rate of the config), `wall_s`. `"kind": "eval"` rows (every `eval_every` steps and at the end): `w2` (the conditional
  Wasserstein distance W_{2,c} of the heads from their initial measure) and `w2_layers`, test
  metrics (`test_loss`, `test_accuracy` for classification), `wall_s`. `"kind": "w2"` rows
  (every `w2_every` steps between evaluations): `step`, `time` (τ after those steps), `w2`.
  With `logging.ntk: true`, `"kind": "ntk"` rows at step 0 and every checkpoint: `time`,
  `lambda_min`, `lambda_max` (the readout NTK in mean-field units), `predicted_slope`
  (-2 lambda_min / N), `num_sequences` (N), `wall_s` (see `run_ntk.py`);
- `checkpoints/step_XXXXXXXX.eqx`: the training state (step, head particles, optimiser state,
  PRNG key), written atomically (temporary file + rename), the last `keep_checkpoints` kept,
  each with its SHA-256 in `step_XXXXXXXX.eqx.sha256` (written first), verified on load: a
  damaged checkpoint is skipped, with the reason, for the newest intact one;
- `.lock`: held (an OS file lock, released when the process ends, even by SIGKILL) by the one
  process that writes the directory: a second `train`/`resume` on it is refused;
- `figures/*.png`: see `figures_run.py` (loss against training time, W2,c, test metrics, every
  layer's particles, token trajectories with their targets; digits: confusion matrix);
- `tensorboard/` (with `logging.tensorboard: true`): the metrics as TensorBoard scalars
  (`tensorboard.py`); `metrics.jsonl` stays the record.
"""

from __future__ import annotations

import dataclasses
import datetime
import fcntl
import hashlib
import io
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import equinox as eqx
import jax
import yaml

from .._errors import ConfigError, InputError
from .._native_attention import native_kernel_status
from . import build
from .build import Run, TrainState
from .config import TrainConfig, train_config_from_dict, train_config_to_dict
from .files import atomic_write

CONFIG_FILE = "config.yaml"
MANIFEST_FILE = "manifest.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoints"
FIGURE_DIR = "figures"
LOCK_FILE = ".lock"


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

    def is_run(self) -> bool:
        """Whether the directory holds a run's config (a run was started here)."""
        return self.config_path.is_file()

    def read_config(self) -> TrainConfig:
        """The run's resolved config. `InputError` if the file is missing, unreadable, not a
        complete resolved config (a run writes every key), or not plain YAML."""
        where = str(self.config_path)
        if not self.config_path.is_file():
            raise InputError(f"{str(self.path)!r} is not a run directory (no {CONFIG_FILE}); give "
                             f"the directory a `meanfield-tf train` run wrote")
        try:
            data = yaml.safe_load(self.config_path.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise InputError(f"{where} is damaged ({first}); restore it from the run's history "
                             f"or start a new run") from None
        missing = [f.name for f in dataclasses.fields(TrainConfig)
                   if not isinstance(data, dict) or f.name not in data]
        if missing:
            raise InputError(f"{where} is not a complete resolved config (missing "
                             f"{', '.join(missing)}); a run writes every key: restore the file or "
                             f"start a new run")
        try:
            return train_config_from_dict(data)
        except ConfigError as err:
            raise InputError(f"{where}: {err}") from None

    def write_manifest(self, cfg: TrainConfig, argv: list[str] | None = None) -> None:
        text = json.dumps(manifest(cfg, argv), indent=2).encode()
        atomic_write(self.path / MANIFEST_FILE, lambda f: f.write(text))

    def record_resume(self, argv: list[str] | None, from_step: int, skipped: list[str]) -> None:
        """Append this resume (time, command, code version, step, skipped checkpoints) to the
        manifest's `history`."""
        path = self.path / MANIFEST_FILE
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            data = {}
        data.setdefault("history", []).append({
            "resumed": _now(), "command": argv, "from_step": from_step,
            "git_commit": git_commit(), "version": _version("meanfield_tf"),
            "skipped_checkpoints": skipped,
        })
        text = json.dumps(data, indent=2).encode()
        atomic_write(path, lambda f: f.write(text))

    # -- the writer's lock --------------------------------------------------------------------
    def lock(self) -> None:
        """Become the one process that writes this directory (until this process ends).

        An OS lock (`flock`) on `.lock`: the kernel releases it when the process exits, however
        it exits, so a killed run never leaves a stale lock. Raises `InputError` if another
        process holds it.
        """
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise InputError(f"run directory {str(self.path)!r} is in use by another meanfield-tf "
                             f"process (pid {holder}); wait for it to finish, or use another "
                             f"--out") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock_fd = fd  # kept open: the lock lives until `unlock` or the process's end

    def unlock(self) -> None:
        """Release the writer's lock taken by `lock` (no-op without one)."""
        fd = getattr(self, "_lock_fd", None)
        if fd is not None:
            os.close(fd)  # closing the descriptor releases the flock
            self._lock_fd = None

    def clean_temporaries(self) -> list[Path]:
        """Remove the temporary files of interrupted atomic writes (call with the lock held)."""
        gone = []
        for folder in (self.path, self.checkpoint_dir):
            if folder.is_dir():
                for p in folder.glob(".*.tmp"):
                    p.unlink(missing_ok=True)
                    gone.append(p)
        return gone

    # -- metrics ------------------------------------------------------------------------------
    def append_metrics(self, row: dict) -> None:
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()

    def read_metrics(self) -> list[dict]:
        """Every complete metrics row (a line cut by a kill, or without a step, is skipped)."""
        if not self.metrics_path.exists():
            return []
        if not self.metrics_path.is_file():
            raise InputError(f"{str(self.metrics_path)!r} is not a file; remove it or restore "
                             f"the run's metrics")
        rows = []
        for line in self.metrics_path.read_text(errors="replace").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a kill
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int):
                rows.append(row)
        return rows

    def truncate_metrics(self, step: int) -> None:
        """Drop rows written after checkpoint `step` (train rows `>= step`, eval rows `> step`)."""
        keep = [r for r in self.read_metrics()
                if (r["step"] < step if r.get("kind") == "train" else r["step"] <= step)]
        text = "".join(json.dumps(r) + "\n" for r in keep).encode()
        atomic_write(self.metrics_path, lambda f: f.write(text))

    # -- checkpoints --------------------------------------------------------------------------
    def checkpoints(self) -> list[tuple[int, Path]]:
        """`(step, path)` of every checkpoint file, oldest first (not yet verified)."""
        if not self.checkpoint_dir.is_dir():
            return []
        out = []
        for p in self.checkpoint_dir.glob("step_*.eqx"):
            try:
                out.append((int(p.stem.split("_")[1]), p))
            except (IndexError, ValueError):
                continue
        return sorted(out)

    def save_checkpoint(self, state: TrainState, keep: int) -> Path:
        """Write `state` atomically with its checksum (checksum first), keep the last `keep`."""
        step = int(state.step)
        path = self.checkpoint_dir / f"step_{step:08d}.eqx"
        buf = io.BytesIO()
        eqx.tree_serialise_leaves(buf, state)
        data = buf.getvalue()
        digest = hashlib.sha256(data).hexdigest().encode()
        atomic_write(_checksum_path(path), lambda f: f.write(digest))
        atomic_write(path, lambda f: f.write(data))
        for _, old in self.checkpoints()[:-keep]:
            old.unlink(missing_ok=True)
            _checksum_path(old).unlink(missing_ok=True)
        return path

    def load_checkpoint(self, like: TrainState, *, report=None) -> TrainState:
        """The newest intact checkpoint (checksum verified, readable), skipping damaged ones with
        a line each to `report` (default: stderr). `InputError` if none is intact."""
        state, skipped = self.load_newest(like)
        for line in skipped:
            print(f"warning: {line}", file=report or sys.stderr)
        if state is None:
            raise InputError(f"run directory {str(self.path)!r} has no intact checkpoint to "
                             f"resume from" + (f" ({'; '.join(skipped)})" if skipped else ""))
        return state

    def load_newest(self, like: TrainState) -> tuple[TrainState | None, list[str]]:
        """`(state or None, reasons)`: the newest checkpoint that passes its checksum and loads,
        and one line per newer checkpoint that was skipped, saying why."""
        skipped = []
        for step, path in reversed(self.checkpoints()):
            try:
                data = path.read_bytes()
                check = _checksum_path(path)
                if check.exists() and check.read_text().strip() != hashlib.sha256(data).hexdigest():
                    raise ValueError("checksum mismatch")
                return eqx.tree_deserialise_leaves(io.BytesIO(data), like), skipped
            except Exception as err:  # damaged: truncated, emptied, garbage, bad checksum
                reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                skipped.append(f"skipped damaged checkpoint {path.name} (step {step}: {reason})")
        return None, skipped


def _checksum_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _version(pkg: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


def git_commit() -> str | None:
    """The commit of the source tree this package runs from (`-dirty` if modified), or None."""
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


def _cpu_attention() -> dict:
    """Which CPU attention path runs (the native kernel or XLA's) and why, for the manifest:
    float32 results of the two differ by rounding, so a rerun elsewhere can be told apart."""
    status = native_kernel_status()
    return {"native_kernel": status.available, "mode": status.mode, "reason": status.reason}


def manifest(cfg: TrainConfig, argv: list[str] | None = None) -> dict:
    """Versions, devices (all processes), process count, seed, git commit and command line."""
    versions = {pkg: _version(pkg) for pkg in ("meanfield_tf", "jax", "jaxlib", "equinox",
                                                "diffrax", "optax", "ott-jax", "numpy",
                                                "scikit-learn")}
    return {
        "versions": versions,
        "python": platform.python_version(),
        "devices": [str(d) for d in jax.devices()],
        "processes": jax.process_count(),
        "coordinator": (cfg.distributed.resolve().coordinator_address
                        if jax.process_count() > 1 else None),
        "backend": jax.default_backend(),
        "cpu_attention": _cpu_attention(),
        "x64": bool(jax.config.jax_enable_x64),
        "seed": cfg.seed,
        "git_commit": git_commit(),
        "command": argv,
        "started": _now(),
        "history": [],
    }


def load_run(path) -> tuple[RunDir, Run, TrainState]:
    """The run directory, its rebuilt `Run` and its last checkpointed state."""
    rd = RunDir(path)
    run = build.run(rd.read_config())
    return rd, run, rd.load_checkpoint(run.initial_state())
