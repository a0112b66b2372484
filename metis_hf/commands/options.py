"""Options several subcommands share."""

from __future__ import annotations

import argparse


def add_set_option(parser: argparse.ArgumentParser, what: str = "a recipe key") -> None:
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"Override {what}, e.g. --set training.num_rounds=3 (repeatable).",
    )
