"""Does a many-shot method collapse? Its merges, round by round, for every seed of a compare run.

Reads the run files `metis-hf compare` writes (runs/base/result.json and
runs/seed*/many_shot-<method>/result.json) and prints one markdown row per seed: the merged
adapter's mask density each round, the multi-task validation loss each round beside the base
model's, the spread of the task weights in the last round and the tasks whose exact match rose
above the base model's. Then the loss drop from the base to the last round, mean ± sd over seeds.
A collapsed merge keeps the base's loss; one that trains lowers it every round.

    python scripts/round_table.py outputs/compare-cpu-7tasks-seeds outputs/compare-cpu-8tasks-seeds \
        --method metis_robust@completion-z
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from _shared import read_json, seed_folders

from metis_hf.evaluation.report import multitask_loss
from metis_hf.round_record import RoundRecord


def rows_for(output_dir: Path, method: str) -> tuple[list[str], list[float]]:
    """Markdown rows (one per seed that ran ``method``) and each seed's loss drop."""
    base = read_json(output_dir / "runs" / "base" / "result.json")
    base_loss = multitask_loss(base)
    rows, drops = [], []
    for seed_dir in seed_folders(output_dir):
        result_file = seed_dir / f"many_shot-{method}" / "result.json"
        if not result_file.exists():
            continue
        run = read_json(result_file)
        rounds = [RoundRecord.from_log(row) for row in run["rounds"]]
        density = ", ".join(f"{r.mask_density:.2f}" for r in rounds)
        losses = " -> ".join(f"{r.multitask_loss:.3f}" for r in rounds)
        alphas = list(rounds[-1].alphas.values())
        above = [t for t, s in run["scores"].items() if s["exact_match"] > base["scores"][t]["exact_match"]]
        drops.append(base_loss - rounds[-1].multitask_loss)
        rows.append(
            f"| {len(run['scores'])} | {seed_dir.name.removeprefix('seed')} | {density} | {base_loss:.3f} | {losses} "
            f"| {min(alphas):.2f}-{max(alphas):.2f} | {', '.join(above) or 'none'} |"
        )
    return rows, drops


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("output_dirs", nargs="+", type=Path, help="`metis-hf compare` output folders.")
    parser.add_argument("--method", required=True, help="A many-shot method or variant name of the grid.")
    args = parser.parse_args()
    print(
        "| T | seed | mask density, rounds | base loss | multi-task validation loss, rounds "
        "| alpha, last round | tasks above the base (exact) |"
    )
    print("|---|---|---|---|---|---|---|")
    summaries = []
    for output_dir in args.output_dirs:
        if not (output_dir / "runs" / "base" / "result.json").exists():
            raise SystemExit(f"{output_dir}: no runs/base/result.json; is it a `metis-hf compare` output?")
        rows, drops = rows_for(output_dir, args.method)
        if not rows:
            raise SystemExit(f"{output_dir}: no finished many_shot-{args.method} run.")
        print("\n".join(rows))
        spread = statistics.stdev(drops) if len(drops) > 1 else 0.0
        summaries.append(
            f"{output_dir}: loss drop base -> last round {statistics.mean(drops):.3f} ± {spread:.3f} "
            f"over {len(drops)} seed(s)"
        )
    print("\n" + "\n".join(summaries))


if __name__ == "__main__":
    main()
