"""``metis-hf mergekit-yaml CONFIG OUT``: mergekit's runner with our methods registered."""

from __future__ import annotations

import argparse


def add_parsers(subparsers) -> None:
    mk = subparsers.add_parser(
        "mergekit-yaml",
        help="Run mergekit's YAML runner with our methods (metis, metis_robust, consensus_ta, ...) registered.",
    )
    mk.add_argument("config")
    mk.add_argument("output_dir")
    mk.add_argument(
        "mergekit_args", nargs=argparse.REMAINDER, help="Passed to mergekit-yaml (e.g. --lazy-unpickle)."
    )
    mk.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from metis_hf.workflows.mergekit_yaml import run_mergekit_yaml

    run_mergekit_yaml(args.config, args.output_dir, args.mergekit_args)
    return 0
