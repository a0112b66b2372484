"""``metis-hf plan RECIPE``: check a recipe without training; its round plan, memory and tokens."""

from __future__ import annotations

import argparse
import json
import os

from metis_hf.commands.options import add_set_option


def add_parsers(subparsers) -> None:
    plan = subparsers.add_parser(
        "plan", help="Check a recipe without training; print its round plan, memory and token estimates."
    )
    plan.add_argument("recipe", nargs="?", default=None, help="Recipe YAML (default: the offline default).")
    add_set_option(plan)
    plan.add_argument(
        "--sequence-length",
        type=int,
        help="Tokens per sequence for the activation estimate (default: max_length).",
    )
    plan.add_argument(
        "--num-processes",
        type=int,
        default=int(os.environ.get("WORLD_SIZE", 1)),
        help="Processes the run will use (accelerate/torchrun; default: $WORLD_SIZE, else 1).",
    )
    plan.add_argument("--json", action="store_true", help="Print the plan as JSON.")
    plan.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from metis_hf.recipe import load_recipe
    from metis_hf.workflows.plan import plan_recipe, render_plan

    if args.num_processes < 1:
        raise ValueError(f"--num-processes must be at least 1, got {args.num_processes}.")
    plan = plan_recipe(load_recipe(args.recipe, args.set), args.sequence_length, processes=args.num_processes)
    print(json.dumps(plan, indent=2) if args.json else render_plan(plan))
    return 1 if plan["problems"] else 0
