"""``metis-hf merge CONFIG OUT``: PEFT adapters or full checkpoints merged from a YAML file."""

from __future__ import annotations

import argparse


def add_parsers(subparsers) -> None:
    merge = subparsers.add_parser(
        "merge", help="Merge PEFT adapters or full checkpoints from a mergekit-style YAML."
    )
    merge.add_argument("config", help="YAML: merge_method, models, base_model, parameters, dtype, space.")
    merge.add_argument("output_dir")
    merge.add_argument("--overwrite", action="store_true", help="Replace an existing output directory.")
    merge.add_argument("--push-to-hub", metavar="REPO_ID", help="Push the merge to this Hub repository.")
    merge.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from metis_hf.hub import check_repo_id, describe_push, push_folder
    from metis_hf.workflows.merge import load_merge_config, run_merge

    config, text = load_merge_config(args.config)
    if args.push_to_hub:
        check_repo_id(args.push_to_hub)  # before the merge, not after
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
        result = push_folder(summary.output_dir, args.push_to_hub, commit_message="metis-hf merge")
        print(describe_push(result, summary.output_dir))
    return 0
