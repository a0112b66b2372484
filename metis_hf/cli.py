"""The ``metis-hf`` command line. Each subcommand is a thin layer over the library."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence


def _cmd_demo(args: argparse.Namespace) -> int:
    from metis_hf.demo import run_demo

    run_demo(recipe=args.recipe, output_dir=args.output_dir, overrides=args.set)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="metis-hf", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="Log at INFO level.")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="Run the offline default recipe end to end and print a score table.")
    demo.add_argument("--recipe", default=None, help="Recipe YAML (default: the embedded offline recipe).")
    demo.add_argument("--output-dir", default="outputs/demo", help="Where results are written.")
    demo.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="Override a recipe key."
    )
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"metis-hf {args.command}: error: {err}", file=sys.stderr)
        return 2
