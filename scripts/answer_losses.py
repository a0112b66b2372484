"""Validation loss on all tokens against the answer tokens only, for every adapter of a compare run.

Why METIS's gaps may miss the task a merge erases: under all-token training the gap is mostly the
prompt's loss. For one seed of a `metis-hf compare` output this loads the base model, each expert
(on its own task) and each many-shot merged adapter, and prints the per-task mean validation loss
over all tokens and over the completion (answer) tokens.

    python scripts/answer_losses.py outputs/compare-cpu --seed 0
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from metis_hf.data import build_tasks
from metis_hf.evaluation.suite import load_for_evaluation
from metis_hf.recipe import load_recipe
from metis_hf.tokenization import tokenize_dataset
from metis_hf.training.loss import per_example_losses


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("compare_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    results = json.loads((args.compare_dir / "results.json").read_text())
    recipe = load_recipe(results["recipe"], results.get("overrides"))
    tasks = build_tasks(recipe.tasks)
    runs = args.compare_dir / "runs" / f"seed{args.seed}"
    merged = sorted(p.parent.name.removeprefix("many_shot-") for p in runs.glob("many_shot-*/adapter"))
    if not merged:
        raise SystemExit(f"no many-shot adapters under {runs}")
    experts = runs / "experts" / "adapter" / "task_adapters"

    model, tokenizer = load_for_evaluation(
        runs / f"many_shot-{merged[0]}" / "adapter", tokenizer=recipe.model
    )
    validation = {t: tokenize_dataset(tokenizer, task.validation, name=t) for t, task in tasks.items()}

    def losses(names: list[str]) -> str:
        cells = []
        for task in names:
            all_tokens, answer = (
                float(per_example_losses(model, validation[task], args.batch_size, only).mean())
                for only in (False, True)
            )
            cells.append(f"{all_tokens:.2f} / {answer:.2f}")
        return " | ".join(cells)

    names = list(tasks)
    print(f"seed {args.seed}: mean validation loss, all tokens / answer tokens\n")
    print("| adapter | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    with torch.no_grad():
        for i, method in enumerate(merged):
            name = f"merged{i}" if i else "default"  # run names may hold '.', which PEFT refuses
            if i:
                model.load_adapter(str(runs / f"many_shot-{method}" / "adapter"), adapter_name=name)
            model.set_adapter(name)
            print(f"| many-shot {method} | {losses(names)} |", flush=True)
        cells = []
        for task in names:  # each expert on its own task only
            model.load_adapter(str(experts / task), adapter_name=f"expert-{task}")
            model.set_adapter(f"expert-{task}")
            cells.append(losses([task]))
        print(f"| expert (own task) | {' | '.join(cells)} |")
        with model.disable_adapter():
            print(f"| base model | {losses(names)} |")


if __name__ == "__main__":
    main()
