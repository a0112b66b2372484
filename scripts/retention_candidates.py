"""Which BIG-bench multiple-choice tasks can serve as retention tasks for a model: its accuracy on
each against chance, and how often it answers with the same choice position (a model that always
picks one position measures nothing, whatever the merge).

    python scripts/retention_candidates.py movie_recommendation date_understanding sports_understanding
    python scripts/retention_candidates.py --sdist bigbench-1.0.0.tar.gz --size 200 TASK...
"""

from __future__ import annotations

import argparse
import collections
import time

from metis_hf.evaluation.retention import (
    ensure_bigbench,
    fetch_bigbench,
    load_multiple_choice,
    multiple_choice_accuracy,
)
from metis_hf.models import load_model_and_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("tasks", nargs="+", help="BIG-bench task names")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--size", type=int, default=200, help="items a task (sampled with seed 0)")
    parser.add_argument(
        "--sdist", help="a downloaded bigbench-1.0.0.tar.gz (else fetched from PyPI when missing)"
    )
    args = parser.parse_args()
    files = (
        dict(zip(args.tasks, fetch_bigbench(args.tasks, args.sdist)))
        if args.sdist
        else ensure_bigbench(args.tasks)
    )
    model, tokenizer = load_model_and_tokenizer(args.model)
    model.eval()
    print("| task | items | base accuracy | chance | most common pick | seconds |\n|---|---|---|---|---|---|")
    for task in args.tasks:
        items = load_multiple_choice(files[task], size=args.size)
        start = time.perf_counter()
        result = multiple_choice_accuracy(model, tokenizer, items, desc=task)
        accuracy, picks = result["accuracy"], result["picks"]
        chance = sum(1 / len(item["choices"]) for item in items) / len(items)
        same = max(collections.Counter(picks).values()) / len(items)
        print(
            f"| {task} | {len(items)} | {accuracy:.3f} | {chance:.3f} | {same:.2f} | {time.perf_counter() - start:.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
