"""`meanfield-tf experiment list | run | report`: the experiments that reproduce the paper's claims.

- `list`: every experiment with its one-line claim;
- `run NAME|all [--out DIR] [--quick] [--seeds K] [key=value ...]`: run one (or every one, into
  `DIR/<name>/`), write its run directory and print its table;
- `report DIR... [--out docs/results.md] [--figures docs/figures]`: the results page.
"""

from __future__ import annotations

import argparse
import sys


class _IntermixedParser(argparse.ArgumentParser):
    """Accepts options between positionals (`run NAME --out D key=value`): argparse otherwise
    consumes the `key=value` positionals at their first occurrence only."""

    _busy = False

    def parse_known_args(self, args=None, namespace=None):
        if self._busy:  # parse_known_intermixed_args calls back into parse_known_args
            return super().parse_known_args(args, namespace)
        self._busy = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._busy = False


def register(sub) -> None:
    p = sub.add_parser(
        "experiment",
        help="reproduce the paper's claims: list, run and report the experiments",
        description="Experiments reproducing each claim of the paper, with figures, numbers and a "
        "generated results page.",
    )
    esub = p.add_subparsers(dest="experiment_command", metavar="ACTION",
                            parser_class=_IntermixedParser)
    p.set_defaults(func=None, default_func=lambda args: (p.print_help(), 0)[1])

    pl = esub.add_parser("list", help="list the experiments with their claims",
                         description="List the experiments, one line each.")
    pl.set_defaults(func=_list)

    pr = esub.add_parser(
        "run", help="run one experiment (or all) into a run directory",
        description="Run an experiment: writes config.yaml, manifest.json, progress.log, "
        "results.json and figures/*.png into --out, and prints its table.",
    )
    pr.add_argument("name", metavar="NAME", help="experiment name (see `experiment list`) or 'all'")
    pr.add_argument("overrides", nargs="*", metavar="key=value",
                    help="override a Config field (strict: the key must exist, the value must "
                    "parse as its type; lists as 1,2,3)")
    pr.add_argument("--out", default=None,
                    help="run directory (default runs/experiments/<name>-<timestamp>); must be "
                    "new, empty, or a previous run of the same experiment")
    pr.add_argument("--quick", action="store_true",
                    help="tiny CPU-friendly sizes (all experiments together about 20 min on 2 "
                    "cores)")
    pr.add_argument("--seeds", type=int, default=None, metavar="K",
                    help="number of random repetitions (experiments with randomness)")
    pr.set_defaults(func=_run)

    pp = esub.add_parser(
        "report", help="write the results page from run directories",
        description="Write a Markdown results page (command, figure, table and discussion per "
        "claim) from experiment run directories; figures are copied beside it.",
    )
    pp.add_argument("dirs", nargs="+", metavar="DIR",
                    help="run directories, or directories holding them (as `run all` writes)")
    pp.add_argument("--out", default="docs/results.md", help="the Markdown page to write")
    pp.add_argument("--figures", default="docs/figures", help="where to copy the PNG figures")
    pp.set_defaults(func=_report)


def _list(args) -> int:
    from ..experiments import list_experiments

    rows = list_experiments()
    width = max(len(n) for n, _ in rows)
    for name, claim in rows:
        print(f"{name.ljust(width)}  {claim}")
    return 0


def _run(args) -> int:
    from ..experiments import get
    from ..experiments._runner import format_table, parse_overrides, run_all, run_experiment

    overrides = parse_overrides(args.overrides)
    argv = ["meanfield-tf", "experiment"] + sys.argv[2:] if sys.argv[1:2] == ["experiment"] \
        else None
    if args.name == "all":
        def show(name, module, results):
            print(f"== {name}")
            print(format_table(module.rows(results)))
            sys.stdout.flush()

        report = run_all(args.out, quick=args.quick, seeds=args.seeds, overrides=overrides,
                         argv=argv, on_result=show)
        failed = [name for name, _, res in report if isinstance(res, Exception)]
        if failed:
            print(f"meanfield-tf experiment: {len(failed)} experiment(s) did not finish: "
                  f"{', '.join(failed)}", file=sys.stderr)
            return 1
        return 0
    module = get(args.name)
    out, results = run_experiment(args.name, args.out, quick=args.quick, seeds=args.seeds,
                                  overrides=overrides, argv=argv)
    print(format_table(module.rows(results)))
    print(f"run directory: {out}")
    return 0


def _report(args) -> int:
    from ..experiments._report import write_report

    out = write_report(args.dirs, args.out, args.figures)
    print(f"wrote {out}")
    return 0
