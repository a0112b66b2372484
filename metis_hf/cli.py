"""The ``metis-hf`` command line. Each subcommand is a thin layer over the library."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence


def _cmd_train(args: argparse.Namespace) -> int:
    from metis_hf.run import run_training

    run_training(args.recipe, args.output_dir, overrides=args.set, evaluate=not args.no_eval)
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    from metis_hf.merge_files import load_merge_config, run_merge

    config, text = load_merge_config(args.config)
    summary = run_merge(config, args.output_dir, overwrite=args.overwrite, config_text=text)
    extra = (
        f"; rank-r truncation dropped {summary.truncation_error:.2%}"
        if summary.truncation_error is not None
        else ""
    )
    print(f"Merged {summary.tensors} tensors ({summary.kind}) into {summary.output_dir}{extra}")
    return 0


def _cmd_mergekit_yaml(args: argparse.Namespace) -> int:
    from mergekit.scripts.run_yaml import main as mergekit_yaml

    from metis_hf.merging.mergekit_bridge import register_with_mergekit

    register_with_mergekit()
    mergekit_yaml.main(args=[args.config, args.output_dir, *args.mergekit_args], standalone_mode=False)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="metis-hf", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="Log at INFO level.")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="Run the offline default recipe end to end and print a score table.")
    demo.add_argument("--output-dir", default="outputs/demo", help="Where results are written.")
    demo.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="Override a recipe key."
    )
    demo.set_defaults(func=_cmd_train, recipe=None, no_eval=False)

    train = sub.add_parser("train", help="Train a recipe with MetisTrainer; score base and merged models.")
    train.add_argument("recipe", help="Recipe YAML (see recipes/).")
    train.add_argument(
        "--output-dir", default="outputs/train", help="Checkpoints, merged adapter, results.json."
    )
    train.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="Override a recipe key, e.g. --set training.num_rounds=3 (repeatable).",
    )
    train.add_argument("--no-eval", action="store_true", help="Skip the generation scores.")
    train.set_defaults(func=_cmd_train)

    merge = sub.add_parser(
        "merge", help="Merge PEFT adapters or full checkpoints from a mergekit-style YAML."
    )
    merge.add_argument("config", help="YAML: merge_method, models, base_model, parameters, dtype, space.")
    merge.add_argument("output_dir")
    merge.add_argument("--overwrite", action="store_true", help="Replace an existing output directory.")
    merge.set_defaults(func=_cmd_merge)

    mk = sub.add_parser(
        "mergekit-yaml",
        help="Run mergekit's YAML runner with metis and consensus_ta registered.",
    )
    mk.add_argument("config")
    mk.add_argument("output_dir")
    mk.add_argument(
        "mergekit_args", nargs=argparse.REMAINDER, help="Passed to mergekit-yaml (e.g. --lazy-unpickle)."
    )
    mk.set_defaults(func=_cmd_mergekit_yaml)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"metis-hf {args.command}: error: {err}", file=sys.stderr)
        return 2
