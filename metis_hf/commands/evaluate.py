"""``metis-hf eval MODEL``: scores and validation losses of a model, checkpoint or adapter."""

from __future__ import annotations

import argparse

from metis_hf.commands.options import add_set_option
from metis_hf.scoring import METRICS


def _names(text: str | None) -> list[str]:
    return [name.strip() for name in (text or "").split(",") if name.strip()]


def add_parsers(subparsers) -> None:
    ev = subparsers.add_parser(
        "eval", help="Score a model, checkpoint or adapter on tasks (and harness tasks)."
    )
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
    ev.add_argument(
        "--metric",
        default="exact_match",
        help="The metric normalized by --experts: "
        + "; ".join(f"{m.name}: {m.help}" for m in METRICS.values()),
    )
    ev.add_argument(
        "--harness", help="Comma-separated lm-evaluation-harness tasks (extra lm-eval), run in process."
    )
    ev.add_argument("--harness-include", help="A folder of custom harness task YAMLs.")
    ev.add_argument("--harness-limit", type=int, default=None, help="Harness examples per task.")
    ev.add_argument("--output", help="Write the results as JSON here.")
    ev.add_argument(
        "--card",
        action="store_true",
        help="Also write the results into MODEL's card (a folder metis-hf wrote) as model-index metadata.",
    )
    add_set_option(ev, "a --recipe key")
    ev.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from metis_hf.evaluation.suite import run_eval

    run_eval(
        args.model,
        recipe=args.recipe,
        tasks=_names(args.tasks),
        tokenizer=args.tokenizer,
        split=args.split,
        limit=args.limit,
        test_size=args.test_size,
        validation_size=args.validation_size,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        loss=not args.no_loss,
        experts=args.experts,
        metric=args.metric,
        harness=_names(args.harness),
        harness_include=args.harness_include,
        harness_limit=args.harness_limit,
        output=args.output,
        overrides=args.set,
        card=args.card,
    )
    return 0
