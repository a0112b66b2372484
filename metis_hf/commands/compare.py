"""``metis-hf compare RECIPE``: every method post hoc and many-shot, with tables and plots."""

from __future__ import annotations

import argparse

from metis_hf.commands.options import add_set_option


def add_parsers(subparsers) -> None:
    cmp_ = subparsers.add_parser(
        "compare", help="Experts, post-hoc merges and many-shot runs of every method; tables and plots."
    )
    cmp_.add_argument("recipe", nargs="?", default=None, help="Recipe YAML (default: the offline default).")
    cmp_.add_argument("--output-dir", default="outputs/compare", help="Results folder (resumes if present).")
    add_set_option(cmp_)
    cmp_.add_argument("--no-plots", action="store_true", help="Skip the PNG plots.")
    cmp_.add_argument("--push-to-hub", metavar="REPO_ID", help="Push the report (card, tables, plots).")
    cmp_.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from metis_hf.workflows.compare import run_compare

    run_compare(
        args.recipe,
        args.output_dir,
        overrides=args.set,
        plots=not args.no_plots,
        push_to_hub=args.push_to_hub,
    )
    return 0
