"""Do a compare's experts learn? Each seed's expert against the base model on its own task.

Reads the run files `metis-hf compare` writes (runs/base/result.json and
runs/seed*/experts/result.json) and prints one markdown row per seed and task: the base's and the
expert's exact match on the test items, the gain with its 95% paired-bootstrap interval over the
items, and whether the gain reaches ``--bar`` (default +0.3, the bar normalized scores need: an
expert barely above the base makes merged / expert move by a whole unit per test item).

    python scripts/expert_gains.py outputs/cross-set-b outputs/compare-answer-tokens
"""

from __future__ import annotations

import argparse
from pathlib import Path

from _shared import read_json, seed_folders

from metis_hf.evaluation.uncertainty import paired_gains


def rows_for(output_dir: Path, bar: float) -> list[str]:
    base = read_json(output_dir / "runs" / "base" / "result.json")["scores"]
    rows = []
    for seed_dir in seed_folders(output_dir):
        experts_file = seed_dir / "experts" / "result.json"
        if not experts_file.exists():
            continue
        experts = read_json(experts_file)["scores"]
        gains = paired_gains(
            {task: base[task]["item_exact_matches"] for task in experts},
            {task: score["item_exact_matches"] for task, score in experts.items()},
        )
        for task, score in experts.items():
            gain, low, high = gains[task]
            rows.append(
                f"| {output_dir.name} | {seed_dir.name.removeprefix('seed')} | {task} | {score['n']} | "
                f"{base[task]['exact_match']:.3f} | {score['exact_match']:.3f} | "
                f"{gain:+.3f} [{low:+.3f}, {high:+.3f}] | {'yes' if gain >= bar - 1e-9 else 'no'} |"
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output_dirs", nargs="+", type=Path, help="metis-hf compare output folders")
    parser.add_argument("--bar", type=float, default=0.3, help="the gain an expert must reach")
    args = parser.parse_args()
    print(f"| set | seed | task | test items | base exact | expert exact | gain [95%] | >= +{args.bar:g} |")
    print("|---|---|---|---|---|---|---|---|")
    for output_dir in args.output_dirs:
        print("\n".join(rows_for(output_dir, args.bar)))


if __name__ == "__main__":
    main()
