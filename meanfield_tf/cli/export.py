"""`meanfield-tf export`: a run's heads at a checkpoint, as the `.npz` that `simulate`, `grad` and
`ntk` read."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser(
        "export",
        help="write a run's heads at a checkpoint as a heads .npz",
        description="Write the head particles of a run directory at a kept checkpoint (default: "
        "the newest intact one; --step 0: the initial heads) as an .npz with A, V (or Q, K, V), "
        "each (N,M,d,d), plus `interpolation` (read back by `simulate --heads`, so the run's "
        "depth interpolation is matched without a flag), `step` and `solver_flags` (the "
        "simulate flags of the run's depth solve).",
    )
    p.add_argument("run_dir", help="run directory written by `meanfield-tf train`")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
    p.add_argument("--out", required=True, help="output .npz")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..workflow.results import export_heads

    info = export_heads(args.run_dir, args.out, step=args.step)
    print(f"wrote the heads of step {info['step']} ({', '.join(info['keys'])}, shape "
          f"{tuple(info['shape'])}, interpolation {info['interpolation']}) to {info['path']}")
    print(f"the run's forward: meanfield-tf simulate --tokens T.npz --heads {info['path']} "
          f"{info['solver_flags']} --out OUT.npz")
    return 0
