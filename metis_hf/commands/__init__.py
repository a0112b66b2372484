"""The ``metis-hf`` command line: one thin module per subcommand over the library's functions."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from huggingface_hub.errors import HfHubHTTPError

from metis_hf.commands import compare, evaluate, merge, mergekit_yaml, plan, push, train
from metis_hf.errors import MetisHFError

SUBCOMMANDS = (train, evaluate, compare, plan, merge, push, mergekit_yaml)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="metis-hf", description="Many-shot model merging (METIS) for LoRA fine-tunes."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="Log at INFO level.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module in SUBCOMMANDS:
        module.add_parsers(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return args.run(args)
    # bad input, files, extras, the Hub, and the project's own known failures
    except (ValueError, OSError, ImportError, HfHubHTTPError, MetisHFError) as err:
        print(f"metis-hf {args.command}: error: {err}", file=sys.stderr)
        return 2
