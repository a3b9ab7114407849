"""The `meanfield-tf` command line: argparse only. Each subcommand parses its flags, hands them to
`meanfield_tf.workflow` (which builds the objects, calls the library and writes the files) and
prints what happened. Each lives in its own module exposing `register(subparsers)`, which adds a
parser whose `func` default is the function to run (`func(args) -> int`).

Errors the library raises on bad input (`MeanFieldError`) are printed as one line on stderr with
exit code 2, never as a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Subcommand modules, in the order `--help` lists them.
_COMMAND_MODULES = ("simulate", "grad", "train", "ntk", "export", "compare", "experiment")


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="meanfield-tf",
        description="Simulate, differentiate and train infinitely deep and wide transformers "
        "(mean-field regime).",
    )
    parser.add_argument("--version", action="version", version=f"meanfield-tf {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        importlib.import_module(f".{name}", __name__).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .._errors import MeanFieldError

    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.argv = ["meanfield-tf", *argv]  # the command as given (recorded in run manifests)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except MeanFieldError as err:
        print(f"meanfield-tf {args.command}: error: {err}", file=sys.stderr)
        return 2
    except FileNotFoundError as err:
        print(f"meanfield-tf {args.command}: error: file not found: {err.filename}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"meanfield-tf {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
