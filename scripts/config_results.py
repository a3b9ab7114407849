"""Run every training config in configs/ and print the README's results table (Markdown).

    python scripts/config_results.py [--out runs/config-results] [--only NAME ...]

Each config runs as committed (no overrides) into its own run directory under --out; the table
gives, per config, the training loss from its first logged value to the mean over the last 10%
of logged steps, the test metrics at the start and the end where the task has a test set, the
distance W2,c travelled by the heads, λ_min of the readout NTK at the first and the last
checkpoint where the config logs it (`logging.ntk`), and the wall time. A config that is not a training config
(simulate, ntk) is skipped.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _row(name: str, cfg, s: dict, first_eval: dict, ntk: list[dict]) -> str:
    steps = cfg.train.steps
    loss = f"loss {s['first_loss']:.2g} → {s['smoothed_loss']:.2g}"
    parts = [loss]
    if "test_accuracy" in s:
        parts = [f"**{100 * s['test_accuracy']:.1f}% test accuracy** "
                 f"({100 * first_eval['test_accuracy']:.1f}% at start)", loss]
    elif "test_loss" in s:
        parts.append(f"test loss {first_eval['test_loss']:.2g} → {s['test_loss']:.2g}")
    parts.append(f"W2,c {s['w2']:.2g}")
    if ntk:  # logging.ntk: the readout NTK at the first and the last checkpoint
        parts.append(f"λ_min(K) {ntk[0]['lambda_min']:.2g} → {ntk[-1]['lambda_min']:.2g}")
    return (f"| `{name}.yaml` | {cfg.task.name} | {steps} | {'; '.join(parts)} | "
            f"{s['wall_s']:.0f} s |")


def main(argv=None) -> int:
    from meanfield_tf.workflow.config import load_train_config
    from meanfield_tf.workflow.rundir import RunDir
    from meanfield_tf.workflow.training import train
    from meanfield_tf import ConfigError

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/config-results", help="parent of the run directories")
    p.add_argument("--only", nargs="*", default=None, help="config names to run (default all)")
    args = p.parse_args(argv)
    rows = []
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        if args.only and path.stem not in args.only:
            continue
        try:
            cfg = load_train_config(path)
        except ConfigError:
            continue  # a simulate or ntk config
        out = Path(args.out) / path.stem
        if out.exists():
            shutil.rmtree(out)
        print(f"running {path.name} ...", file=sys.stderr, flush=True)
        summary = train(cfg, out, progress=False)
        metrics = RunDir(out).read_metrics()
        first_eval = next(r for r in metrics if r.get("kind") == "eval")
        ntk = sorted((r for r in metrics if r.get("kind") == "ntk"), key=lambda r: r["step"])
        rows.append(_row(path.stem, cfg, summary, first_eval, ntk))
    day = datetime.date.today().isoformat()
    print(f"Results of the committed configs ({platform.machine()} CPU, {day}, "
          f"`python scripts/config_results.py`; loss: first logged → mean over the last 10% of "
          f"logged steps):\n")
    print("| config | task | steps | result | wall |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
