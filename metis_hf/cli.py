"""The ``metis-hf`` command line. Each subcommand is a thin layer over the library."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from huggingface_hub.errors import HfHubHTTPError


def _cmd_train(args: argparse.Namespace) -> int:
    from metis_hf.run import run_training

    run_training(
        args.recipe, args.output_dir, overrides=args.set, evaluate=not args.no_eval, overwrite=args.overwrite
    )
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    from metis_hf.merge_files import load_merge_config, run_merge

    config, text = load_merge_config(args.config)
    if args.push_to_hub:
        from metis_hf.hub import check_repo_id

        check_repo_id(args.push_to_hub)
    summary = run_merge(
        config, args.output_dir, overwrite=args.overwrite, config_text=text, config_path=args.config
    )
    extra = (
        f"; rank-r truncation dropped {summary.truncation_error:.2%}"
        if summary.truncation_error is not None
        else ""
    )
    print(f"Merged {summary.tensors} tensors ({summary.kind}) into {summary.output_dir}{extra}")
    if args.push_to_hub:
        from metis_hf.hub import describe_push, push_folder

        result = push_folder(summary.output_dir, args.push_to_hub, commit_message="metis-hf merge")
        print(describe_push(result, summary.output_dir))
    return 0


def _cmd_mergekit_yaml(args: argparse.Namespace) -> int:
    from metis_hf.merging.mergekit_bridge import run_mergekit_yaml

    run_mergekit_yaml(args.config, args.output_dir, args.mergekit_args)
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from metis_hf.evaluation.suite import run_eval

    run_eval(args)
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from metis_hf.compare import run_compare

    run_compare(
        args.recipe,
        args.output_dir,
        overrides=args.set,
        plots=not args.no_plots,
        push_to_hub=args.push_to_hub,
    )
    return 0


def _cmd_push(args: argparse.Namespace) -> int:
    from metis_hf.hub import describe_push, push_folder

    result = push_folder(
        args.folder,
        args.repo_id,
        private=args.private,
        revision=args.revision,
        dry_run=args.dry_run,
        allow_pickle=args.allow_pickle,
        commit_message=args.commit_message,
        stage_dir=args.stage_dir,
        include_checkpoints=args.include_checkpoints,
    )
    print(describe_push(result, args.folder))
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
    demo.set_defaults(func=_cmd_train, recipe=None, no_eval=False, overwrite=True)  # a demo reruns

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
    train.add_argument(
        "--overwrite", action="store_true", help="Replace an earlier run's outputs in --output-dir."
    )
    train.set_defaults(func=_cmd_train)

    ev = sub.add_parser("eval", help="Score a model, checkpoint or adapter on tasks (and harness tasks).")
    ev.add_argument("model", help="Built-in name, Hub id, model folder or PEFT adapter folder.")
    ev.add_argument("--recipe", help="Take the tasks and evaluation settings from this recipe.")
    ev.add_argument("--tasks", help="Comma-separated reasoning-gym task names (instead of --recipe).")
    ev.add_argument("--tokenizer", help="Tokenizer to use (default: the model's or adapter's).")
    ev.add_argument("--split", default=None, help="Split scored by generation (default: test).")
    ev.add_argument("--limit", type=int, default=None, help="At most this many examples per task.")
    ev.add_argument("--test-size", type=int, default=200, help="With --tasks: test items per task.")
    ev.add_argument("--validation-size", type=int, default=100, help="With --tasks: validation items.")
    ev.add_argument("--batch-size", type=int, default=None, help="Generation batch size.")
    ev.add_argument("--max-new-tokens", type=int, default=None, help="Longest generated answer.")
    ev.add_argument("--no-loss", action="store_true", help="Skip the validation loss.")
    ev.add_argument(
        "--experts", help="JSON of per-task expert scores (or an eval output): adds normalized scores."
    )
    ev.add_argument("--metric", default="exact_match", help="exact_match or score, for normalized scores.")
    ev.add_argument(
        "--harness", help="Comma-separated lm-evaluation-harness tasks (extra lm-eval), run in process."
    )
    ev.add_argument("--harness-include", help="A folder of custom harness task YAMLs.")
    ev.add_argument("--harness-limit", type=int, default=None, help="Harness examples per task.")
    ev.add_argument("--output", help="Write the results as JSON here.")
    ev.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="Override a --recipe key."
    )
    ev.set_defaults(func=_cmd_eval)

    cmp_ = sub.add_parser(
        "compare", help="Experts, post-hoc merges and many-shot runs of every method; tables and plots."
    )
    cmp_.add_argument("recipe", nargs="?", default=None, help="Recipe YAML (default: the offline default).")
    cmp_.add_argument("--output-dir", default="outputs/compare", help="Results folder (resumes if present).")
    cmp_.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="Override a recipe key."
    )
    cmp_.add_argument("--no-plots", action="store_true", help="Skip the PNG plots.")
    cmp_.add_argument("--push-to-hub", metavar="REPO_ID", help="Push the report (card, tables, plots).")
    cmp_.set_defaults(func=_cmd_compare)

    merge = sub.add_parser(
        "merge", help="Merge PEFT adapters or full checkpoints from a mergekit-style YAML."
    )
    merge.add_argument("config", help="YAML: merge_method, models, base_model, parameters, dtype, space.")
    merge.add_argument("output_dir")
    merge.add_argument("--overwrite", action="store_true", help="Replace an existing output directory.")
    merge.add_argument("--push-to-hub", metavar="REPO_ID", help="Push the merge to this Hub repository.")
    merge.set_defaults(func=_cmd_merge)

    push = sub.add_parser(
        "push", help="Push a merged adapter, model or compare report to the Hub, with its model card."
    )
    push.add_argument("folder", help="Output of train (its merged/ folder), merge or compare.")
    push.add_argument("repo_id", help="namespace/name on the Hub (created if missing).")
    push.add_argument("--private", action="store_true", help="Create the repository private.")
    push.add_argument("--revision", help="Branch to push to (created if missing).")
    push.add_argument("--dry-run", action="store_true", help="Stage and list what would be uploaded.")
    push.add_argument("--stage-dir", help="Where to stage (default: a temporary folder).")
    push.add_argument("--commit-message", help="Commit message (default: 'Upload with metis-hf').")
    push.add_argument(
        "--allow-pickle", action="store_true", help="Push pickle weights (*.bin) when no safetensors exist."
    )
    push.add_argument(
        "--include-checkpoints",
        action="store_true",
        help="Also push checkpoint-N/ folders (their safetensors and configs; never optimizer pickles).",
    )
    push.set_defaults(func=_cmd_push)

    mk = sub.add_parser(
        "mergekit-yaml",
        help="Run mergekit's YAML runner with metis, metis_robust and consensus_ta registered.",
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
    except (ValueError, OSError, ImportError, HfHubHTTPError) as err:  # bad input, files, extras, Hub
        print(f"metis-hf {args.command}: error: {err}", file=sys.stderr)
        return 2
