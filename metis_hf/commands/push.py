"""``metis-hf push FOLDER REPO_ID``: a merged adapter, model or compare report to the Hub."""

from __future__ import annotations

import argparse


def add_parsers(subparsers) -> None:
    push = subparsers.add_parser(
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
    push.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
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
