"""Do a compare's experts learn? Each seed's expert against the base model on its own task.

Reads the run files `metis-hf compare` writes (runs/base/result.json and
runs/seed*/experts/result.json) and prints one markdown row per seed and task: the base's and the
expert's exact match on the test items, the gain with its 95% paired-bootstrap interval over the
items, whether the gain reaches ``--bar`` (default +0.3, the bar normalized scores need: an
expert barely above the base makes merged / expert move by a whole unit per test item), and the
share of the test items whose answer is the most common one (what always giving it scores), with
the expert's exact match over that (an expert whose interval there reaches 0 may have learned the
answer distribution rather than the task).

    python scripts/expert_gains.py outputs/cross-set-b outputs/compare-answer-tokens

With ``--by-answer TASK`` (a task with few distinct answers), it prints instead how often the base
and each seed's expert are right on the test items of each gold answer: an expert that learned the
answer distribution and not the task is right on one answer and wrong on the others.

    python scripts/expert_gains.py outputs/cross-set-b --by-answer acre
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

from _shared import read_json, seed_folders

from metis_hf.evaluation.generation import most_common_answers
from metis_hf.evaluation.report import expert_checks


def task_of(base: dict, task: str):
    """``task`` rebuilt from the task settings the base run recorded."""
    from metis_hf.data import build_task

    return build_task(next(t for t in base["settings"]["tasks"] if t["name"] == task))


def experts_by_seed(output_dir: Path) -> dict[int, dict]:
    """Each seed's experts run, by seed, for the seeds whose experts have run."""
    return {
        int(seed_dir.name.removeprefix("seed")): read_json(seed_dir / "experts" / "result.json")
        for seed_dir in seed_folders(output_dir)
        if (seed_dir / "experts" / "result.json").exists()
    }


def rows_for(output_dir: Path, bar: float) -> list[str]:
    base = read_json(output_dir / "runs" / "base" / "result.json")
    experts = experts_by_seed(output_dir)
    tasks = list(next(iter(experts.values()))["scores"]) if experts else []
    most_common = most_common_answers({task: task_of(base, task) for task in tasks})
    rows = []
    for check in expert_checks(base, experts, tasks, "exact_match", most_common):
        gain, low, high = check["over_base"]
        over, over_low, over_high = check["over_most_common"]
        answer = check["most_common_answer"]
        shown = answer if len(answer) <= 12 else answer[:11] + "…"
        rows.append(
            f"| {output_dir.name} | {check['seed']} | {check['task']} | "
            f"{experts[check['seed']]['scores'][check['task']]['n']} | {check['base']:.3f} | "
            f"{check['expert']:.3f} | {gain:+.3f} [{low:+.3f}, {high:+.3f}] | "
            f"{'yes' if gain >= bar - 1e-9 else 'no'} | {check['most_common']:.3f} ({shown}) | "
            f"{over:+.3f} [{over_low:+.3f}, {over_high:+.3f}] |"
        )
    return rows


def by_answer_rows(output_dir: Path, task: str) -> list[str]:
    base = read_json(output_dir / "runs" / "base" / "result.json")
    answers = task_of(base, task).test["answer"]
    runs = {"base": base["scores"][task]["item_exact_matches"]}
    for seed, experts in experts_by_seed(output_dir).items():
        runs[f"expert, seed{seed}"] = experts["scores"][task]["item_exact_matches"]
    rows = []
    for run, matches in runs.items():
        right: dict[str, list[float]] = defaultdict(list)
        for answer, match in zip(answers, matches, strict=True):
            right[answer].append(match)
        for answer, items in sorted(right.items(), key=lambda kv: -len(kv[1])):
            rows.append(f"| {task} | {run} | {answer} | {len(items)} | {sum(items) / len(items):.3f} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output_dirs", nargs="+", type=Path, help="metis-hf compare output folders")
    parser.add_argument("--bar", type=float, default=0.3, help="the gain an expert must reach")
    parser.add_argument("--by-answer", metavar="TASK", help="exact match per gold answer of TASK")
    args = parser.parse_args()
    if args.by_answer:
        print("| task | run | gold answer | test items | exact match |\n|---|---|---|---|---|")
        for output_dir in args.output_dirs:
            print("\n".join(by_answer_rows(output_dir, args.by_answer)))
        return
    print(
        f"| set | seed | task | test items | base exact | expert exact | gain [95%] | >= +{args.bar:g} "
        "| most common answer's share | expert over it [95%] |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for output_dir in args.output_dirs:
        print("\n".join(rows_for(output_dir, args.bar)))


if __name__ == "__main__":
    main()
