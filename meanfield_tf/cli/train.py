"""`meanfield-tf train | resume | eval`: train the head measure by its conditional Wasserstein
gradient flow, continue a stopped run, report a run's final metrics."""

from __future__ import annotations

import argparse
import datetime
import math
import sys
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train the heads by their gradient flow (writes a run directory)",
        description="Train the head measure by the conditional Wasserstein gradient flow "
        "(particles move in theta only; plain SGD on the mean-field gradients g = L*M*dR/dtheta is "
        "explicit Euler in training time). With no arguments: the default teacher-student run. "
        "Writes config.yaml, manifest.json, metrics.jsonl, checkpoints/ and figures/ into the run "
        "directory.",
    )
    p.add_argument("--config", default=None,
                   help="YAML training config (see configs/; default: the built-in teacher-student)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted config overrides, e.g. train.steps=200 train.learning_rate=0.5")
    p.add_argument("--out", default=None,
                   help="run directory (default: runs/<config name>-<timestamp>/)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--sphere", action="store_true",
                   help="tokens on the unit sphere (the override solver.sphere=true)")
    p.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="run a grid: the cartesian product of every --sweep's values (each run "
                   "in its own directory under --out, the sweep directory)")
    p.add_argument("--seeds", type=int, default=None,
                   help="with --sweep (or alone): K runs per grid point, seeds seed+0..seed+K-1; "
                   "writes sweep.md/json/png with mean +- standard error across seeds")
    p.epilog = ("Several processes (hosts): start the same command on each, with "
                "MEANFIELD_TF_COORDINATOR_ADDRESS=host:port, MEANFIELD_TF_NUM_PROCESSES=N and "
                "MEANFIELD_TF_PROCESS_ID=i (or distributed.* overrides) and a mesh over all their "
                "devices; process 0 writes the run directory (see docs/scaling.md).")
    p.set_defaults(func=run_train)

    r = sub.add_parser(
        "resume",
        help="continue a stopped training run from its last checkpoint",
        description="Continue a run from its newest intact checkpoint (from step 0 if it stopped "
        "before its first) to the configured total steps. KEY=VALUE overrides may change only "
        "how the same experiment continues: train.steps (e.g. 2000 to extend), "
        "train.learning_rate (no recompilation), the schedule, the log/eval/checkpoint cadence, "
        "mesh and distributed; anything else is refused as a different experiment. Each resume "
        "is recorded in manifest.json's history.",
    )
    r.add_argument("run_dir", help="run directory written by `meanfield-tf train`")
    r.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")
    r.add_argument("--quiet", action="store_true", help="no progress output")
    r.set_defaults(func=run_resume)

    e = sub.add_parser(
        "eval",
        help="report a run's final metrics from its last checkpoint",
        description="Load the last checkpoint of a run and report the training loss, the "
        "distance W2,c travelled by the heads, and test metrics (test accuracy for "
        "classification). Also writes eval.json into the run directory.",
    )
    e.add_argument("run_dir", help="run directory written by `meanfield-tf train`")
    e.set_defaults(func=run_eval)


def _default_out(name: str) -> Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{name}-{stamp}"


def _orders(first, last) -> str:
    if first and last and first > 0 and last > 0:
        return f" ({math.log10(first / last):.1f} orders of magnitude)"
    return ""


def _report(summary: dict, out=None) -> None:
    out = out or sys.stdout
    if "loss" in summary:
        a, b = summary["smoothed_over"]
        window = f"steps {a}-{b}" if a != b else f"step {a}"
        orders = "" if "test_accuracy" in summary else _orders(summary["first_loss"],
                                                                summary["smoothed_loss"])
        print(f"step {summary['step']}: training loss {summary['first_loss']:.4e} -> "
              f"{summary['smoothed_loss']:.4e} (mean over the logged {window}; last "
              f"{summary['loss']:.4e}){orders}; wall time {summary['wall_s']:.1f} s", file=out)
    if "w2" in summary:
        print(f"heads moved W2,c = {summary['w2']:.4g} from their initial measure", file=out)
    if "w2_units" in summary:
        print(f"MLP units moved W2,c = {summary['w2_units']:.4g} from their initial measure",
              file=out)
    if "test_loss" in summary:
        print(f"test loss {summary['test_loss']:.4e}", file=out)
    if "test_accuracy" in summary:
        init = summary.get("initial_test_accuracy")
        print(f"test accuracy {summary['test_accuracy']:.4f}"
              + (f" (initial {init:.4f})" if init is not None else ""), file=out)
    print(f"run directory: {summary['run_dir']}", file=out)


def _join(cfg) -> bool:
    """Join the multi-process run of `cfg.distributed` / the MEANFIELD_TF_* environment (if any)
    before anything touches a device; True on the process that reports (process 0). The
    native libraries' standard output (gloo's connection chatter) is dropped on every process
    of a multi-process run; standard error is untouched."""
    from ..workflow.processes import initialize_distributed, quiet_native_stdout

    if cfg.distributed.resolve().enabled:
        quiet_native_stdout()
    return initialize_distributed(cfg.distributed).is_main


def run_train(args: argparse.Namespace) -> int:
    from ..workflow.config import load_train_config
    from ..workflow.training import train

    if args.sphere:
        args.overrides = [*args.overrides, "solver.sphere=true"]
    cfg = load_train_config(args.config, args.overrides)
    if args.sweep or args.seeds is not None:
        return _run_sweep(args, cfg)
    main = _join(cfg)
    out = Path(args.out) if args.out else _default_out(cfg.name)
    if not main:  # several processes: process 0 reports and writes the run directory
        train(cfg, out, argv=args.argv, progress=False)
        return 0
    units = (f" + M'={cfg.heads.units} {cfg.heads.activation} units ({cfg.heads.block})"
             if cfg.heads.units else "")
    print(f"training {cfg.name} ({cfg.task.name}, L={cfg.heads.layers} x M={cfg.heads.heads} heads"
          f"{units}, d={cfg.heads.dim}, {cfg.train.steps} steps of {cfg.train.optimizer} "
          f"lr={cfg.train.learning_rate}, {cfg.dtype}) -> {out}", flush=True)
    summary = train(cfg, out, argv=args.argv, progress=not args.quiet)
    _report(summary)
    return 0


def _run_sweep(args: argparse.Namespace, cfg) -> int:
    from ..workflow.sweep import parse_sweep, run_sweep

    grid = parse_sweep(args.sweep)
    out = Path(args.out) if args.out else _default_out(f"{cfg.name}-sweep")
    print(f"sweep of {cfg.name} over {', '.join(k for k, _ in grid) or 'seeds'} "
          f"({args.seeds or 1} seed(s) per point) -> {out}", flush=True)
    summary = run_sweep(args.config, args.overrides, grid, args.seeds or 1, out, argv=args.argv)
    print(open(summary["files"][0]).read(), end="")
    print(f"wrote {', '.join(summary['files'])}")
    return 0


def run_resume(args: argparse.Namespace) -> int:
    from ..workflow.config.train import continue_config
    from ..workflow.rundir import RunDir
    from ..workflow.training import train

    rd = RunDir(args.run_dir)
    cfg = continue_config(rd.read_config(), args.overrides)
    if not _join(cfg):  # several processes: process 0 reports and writes the run directory
        train(cfg, rd.path, resume=True, argv=args.argv, progress=False)
        return 0
    ckpts = rd.checkpoints()
    at = ckpts[-1][0] if ckpts else 0
    print(f"resuming {rd.path} from step {at} to {cfg.train.steps}", flush=True)
    summary = train(cfg, rd.path, resume=True, argv=args.argv, progress=not args.quiet)
    _report(summary)
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from ..workflow.evaluation import evaluate_run

    out = evaluate_run(args.run_dir)
    print(f"evaluating {args.run_dir} at its checkpoint of step {out['step']}")
    print(f"training loss on {out['train_data']}: {out['train_loss']:.4e}, gradient norm "
          f"{out['grad_norm']:.3e}, W2,c from init {out['w2']:.4g}")
    if "test_loss" in out:
        print(f"test loss on {out['test_data']}: {out['test_loss']:.4e}")
    if "test_accuracy" in out:
        print(f"test accuracy {out['test_accuracy']:.4f}")
    if out["written"]:
        print(f"wrote {out['written']}")
    else:
        print(f"{args.run_dir} is read-only: eval.json not written")
    return 0
