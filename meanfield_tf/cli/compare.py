"""`meanfield-tf compare`: several runs side by side (curves overlaid, a table of final metrics
and of the config keys that differ)."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser(
        "compare",
        help="overlay the curves of several runs and tabulate their differences",
        description="Read run directories (nothing is recomputed) and write into --out: "
        "compare.png (training loss against training time tau = sum of lr and against the step, "
        "test loss dashed, W2,c of the heads from their start), compare.md and compare.json "
        "(final metrics of every run, and the config keys whose values differ).",
    )
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directories")
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..workflow.compare import compare_runs

    report = compare_runs(args.runs, args.out)
    for row in report["runs"]:
        f = row["final"]
        loss = f"loss {f['loss']:.4e}" if f["loss"] is not None else "no training rows"
        extra = "".join(f", {k} {v:.4g}" for k, v in row["config"].items()
                        if isinstance(v, (int, float)) and not isinstance(v, bool))
        print(f"{row['label']}: {loss}" + (f", test accuracy {f['test_accuracy']:.4f}"
                                           if f["test_accuracy"] is not None else "") + extra)
    differing = ", ".join(report["differences"]) or "none (same config)"
    print(f"config keys that differ: {differing}")
    print(f"wrote {', '.join(report['files'])}")
    return 0
