"""`metis-hf plan`'s estimates against a measured training run (CPU: resident memory).

Runs `metis-hf train` on a recipe (shortened by --set overrides) under /usr/bin/time, and a second
process that only imports what training imports; the training's peak resident set minus that
baseline is compared with the plan's memory estimate, at the longest tokenized training sequence
(what the activation term assumes) and at max_length. Optimizer steps: the plan's count against
the steps the trainer logged.

    python benchmarks/plan_check.py recipes/offline/cpu-4tasks-all-tokens.yaml \
        --set training.num_rounds=1 --set training.local_steps=4
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

IMPORTS = "import torch, transformers, trl, peft, datasets, metis_hf.training, metis_hf.workflows.train"


def peak_rss_mib(command: list[str]) -> float:
    """Peak resident memory of ``command`` (GNU time's maximum resident set size)."""
    done = subprocess.run(["/usr/bin/time", "-f", "%M", *command], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    return int(done.stderr.strip().splitlines()[-1]) / 1024


def longest_sequence(recipe) -> int:
    from metis_hf.data import build_tasks
    from metis_hf.models import load_tokenizer
    from metis_hf.tokenization import tokenize_dataset

    tokenizer = load_tokenizer(recipe.model)
    limit = recipe.training.get("max_length") or 512
    longest = 0
    for task in build_tasks(recipe.tasks).values():
        tokenized = tokenize_dataset(tokenizer, task.train, limit)
        longest = max(longest, max(len(ids) for ids in tokenized["input_ids"]))
    return longest


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("recipe")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()

    from metis_hf.recipe import load_recipe
    from metis_hf.workflows.plan import plan_recipe

    recipe = load_recipe(args.recipe, args.set)
    length = longest_sequence(recipe)
    at_length, at_cap = plan_recipe(recipe, sequence_length=length), plan_recipe(recipe)
    baseline = peak_rss_mib([sys.executable, "-c", IMPORTS])
    with tempfile.TemporaryDirectory() as out:
        overrides = [f"--set={o}" for o in args.set]
        train = [
            sys.executable,
            "-m",
            "metis_hf",
            "train",
            args.recipe,
            "--output-dir",
            out,
            "--no-eval",
            *overrides,
        ]
        peak = peak_rss_mib(train)
        log = next(Path(out).rglob("rounds.jsonl"))
        rounds = [json.loads(line) for line in log.read_text().splitlines()]
    steps = rounds[-1].get("step") if rounds else None
    measured = peak - baseline
    print(f"recipe {args.recipe} {' '.join(args.set)}; longest training sequence {length} tokens")
    print(f"optimizer steps: plan {at_length['optimizer_steps']}, trainer {steps}")
    print(f"peak RSS {peak:.0f} MiB, imports alone {baseline:.0f} MiB: training used {measured:.0f} MiB")
    for name, plan in (
        (f"at {length} tokens", at_length),
        (f"at max_length {at_cap['sequence_length']}", at_cap),
    ):
        estimate = plan["memory_total_bytes"] / 2**20
        parts = ", ".join(f"{k} {v / 2**20:.0f}" for k, v in plan["memory_bytes"].items())
        print(f"plan {name}: {estimate:.0f} MiB ({parts}); estimate / measured {estimate / measured:.2f}")


if __name__ == "__main__":
    main()
