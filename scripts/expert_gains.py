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
from collections import Counter, defaultdict
from pathlib import Path

from _shared import read_json, seed_folders

from metis_hf.evaluation.uncertainty import paired_gains


def test_answers(base: dict, task: str) -> list[str]:
    """The gold answers of ``task``'s test items, rebuilt from the task settings the run recorded."""
    from metis_hf.data import build_task

    spec = next(t for t in base["settings"]["tasks"] if t["name"] == task)
    return list(build_task(spec).test["answer"])


def experts_by_seed(output_dir: Path) -> dict[str, dict]:
    """Each seed's expert scores, by seed ("0", "1", ...), for the seeds whose experts have run."""
    return {
        seed_dir.name.removeprefix("seed"): read_json(seed_dir / "experts" / "result.json")["scores"]
        for seed_dir in seed_folders(output_dir)
        if (seed_dir / "experts" / "result.json").exists()
    }


def rows_for(output_dir: Path, bar: float) -> list[str]:
    base = read_json(output_dir / "runs" / "base" / "result.json")
    # each task's most common test answer, and the items that always giving it gets right
    majority: dict[str, tuple[str, list[float]]] = {}
    rows = []
    for seed, experts in experts_by_seed(output_dir).items():
        for task in experts.keys() - majority.keys():
            answers = test_answers(base, task)
            answer = Counter(answers).most_common(1)[0][0]
            majority[task] = (answer, [float(a == answer) for a in answers])
        expert_items = {task: score["item_exact_matches"] for task, score in experts.items()}
        gains = paired_gains(
            {task: base["scores"][task]["item_exact_matches"] for task in experts}, expert_items
        )
        over_majority = paired_gains({task: majority[task][1] for task in experts}, expert_items)
        for task, score in experts.items():
            gain, low, high = gains[task]
            answer, always = majority[task]
            shown = answer if len(answer) <= 12 else answer[:11] + "…"
            over, over_low, over_high = over_majority[task]
            rows.append(
                f"| {output_dir.name} | {seed} | {task} | {score['n']} | "
                f"{base['scores'][task]['exact_match']:.3f} | {score['exact_match']:.3f} | "
                f"{gain:+.3f} [{low:+.3f}, {high:+.3f}] | {'yes' if gain >= bar - 1e-9 else 'no'} | "
                f"{sum(always) / len(always):.3f} ({shown}) | {over:+.3f} [{over_low:+.3f}, {over_high:+.3f}] |"
            )
    return rows


def by_answer_rows(output_dir: Path, task: str) -> list[str]:
    base = read_json(output_dir / "runs" / "base" / "result.json")
    answers = test_answers(base, task)
    runs = {"base": base["scores"][task]["item_exact_matches"]}
    for seed, experts in experts_by_seed(output_dir).items():
        runs[f"expert, seed{seed}"] = experts[task]["item_exact_matches"]
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
