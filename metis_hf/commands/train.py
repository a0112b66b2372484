"""``metis-hf train RECIPE`` and ``metis-hf demo``: a recipe through MetisTrainer, then scores."""

from __future__ import annotations

import argparse

from metis_hf.commands.options import add_set_option


def add_parsers(subparsers) -> None:
    demo = subparsers.add_parser(
        "demo", help="Run the offline default recipe end to end and print a score table."
    )
    demo.add_argument("--output-dir", default="outputs/demo", help="Where results are written.")
    add_set_option(demo)
    demo.set_defaults(run=run, recipe=None, no_eval=False, overwrite=True, resume=None)  # a demo reruns

    train = subparsers.add_parser(
        "train", help="Train a recipe with MetisTrainer; score base and merged models."
    )
    train.add_argument("recipe", help="Recipe YAML (see recipes/).")
    train.add_argument(
        "--output-dir", default="outputs/train", help="Checkpoints, merged adapter, results.json."
    )
    add_set_option(train)
    train.add_argument("--no-eval", action="store_true", help="Skip the generation scores.")
    train.add_argument(
        "--overwrite", action="store_true", help="Replace an earlier run's outputs in --output-dir."
    )
    train.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=None,
        metavar="CHECKPOINT",
        help="Continue an interrupted run: from CHECKPOINT, or from the latest checkpoint-N in --output-dir.",
    )
    train.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from metis_hf.workflows.train import run_training

    run_training(
        args.recipe,
        args.output_dir,
        overrides=args.set,
        evaluate=not args.no_eval,
        overwrite=args.overwrite,
        resume=args.resume,
    )
    return 0
