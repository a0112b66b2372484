"""Pool the seeds of several `metis-hf compare` runs and pair one many-shot method with others.

A compare run computes only the seeds it is given, so seeds added later (a second session, a
second output folder) land in another folder. This reads the run files of every folder
(runs/seed*/experts and runs/seed*/many_shot-<method>/result.json), normalizes each run by its own
seed's experts, as `metis-hf compare` does, and prints two markdown tables: the normalized score
per task (mean over seeds) with Avg and Worst (mean ± sd of the per-seed values), and the paired
differences A - B on the seeds both ran (mean ± sd, each seed's value, wins, and the paired t).
`--tasks` restricts Avg and Worst to some tasks, e.g. those whose experts beat their answer prior.

    python scripts/paired_seeds.py outputs/compare-cpu outputs/compare-cpu-seeds3-4 \
        --a metis_robust@completion-z --b consensus_ta task_arithmetic
"""

from __future__ import annotations

import argparse
import math
import statistics
from pathlib import Path
from typing import Any

from _shared import read_json, seed_folders

from metis_hf.evaluation.report import build_report, mean_sd, mean_sd_cell
from metis_hf.recipe import CompareSpec


def collect_runs(output_dirs: list[Path], methods: list[str]) -> list[dict[str, Any]]:
    """The experts and the named many-shot runs of every folder; a seed's run found in two
    folders is refused (pooling it twice would count one seed as two)."""
    runs: dict[tuple[int, str, str | None], dict[str, Any]] = {}
    for output_dir in output_dirs:
        seed_dirs = seed_folders(output_dir)
        if not seed_dirs:
            raise SystemExit(f"{output_dir}: no runs/seed*/; is it a `metis-hf compare` output?")
        for seed_dir in seed_dirs:
            wanted = [seed_dir / "experts"] + [seed_dir / f"many_shot-{m}" for m in methods]
            for run_dir in (d for d in wanted if (d / "result.json").exists()):
                run = read_json(run_dir / "result.json")
                key = (run["seed"], run["kind"], run["method"])
                if key in runs:
                    raise SystemExit(
                        f"{run_dir}: seed {run['seed']} {run['kind']} {run['method']} is in two folders."
                    )
                runs[key] = run
    return list(runs.values())


def paired_t(diffs: list[float]) -> float:
    """The paired t statistic, mean / (sd / sqrt(n)); +-inf when every seed gives the same nonzero
    difference, nan when it is zero in every seed (or there is one seed)."""
    if len(diffs) < 2:
        return math.nan
    spread = statistics.stdev(diffs)
    mean = statistics.fmean(diffs)
    if spread == 0:
        return math.nan if mean == 0 else math.copysign(math.inf, mean)
    return mean / (spread / math.sqrt(len(diffs)))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("output_dirs", nargs="+", type=Path, help="`metis-hf compare` output folders.")
    parser.add_argument("--a", required=True, help="The many-shot method (or variant) compared.")
    parser.add_argument("--b", nargs="+", required=True, help="Many-shot methods it is compared with.")
    parser.add_argument("--metric", default="exact_match", choices=["exact_match", "score"])
    parser.add_argument(
        "--tasks",
        nargs="+",
        help="Only these tasks in Avg and Worst (say, those whose experts beat their answer prior).",
    )
    args = parser.parse_args()

    methods = [args.a, *args.b]
    results = collect_runs(args.output_dirs, methods)
    experts = [r for r in results if r["kind"] == "experts"]
    if not experts:
        raise SystemExit("no experts run found: normalized scores need each seed's experts.")
    tasks = list(experts[0]["scores"])
    if args.tasks:
        unknown = sorted(set(args.tasks) - set(tasks))
        if unknown:
            raise SystemExit(f"--tasks: {', '.join(unknown)} not among the experts' tasks {tasks}.")
        tasks = [t for t in tasks if t in args.tasks]
    report = build_report(results, tasks, CompareSpec(metric=args.metric))
    summaries = {key.removeprefix("many_shot/"): by_seed for key, by_seed in report["summaries"].items()}
    missing = [m for m in methods if m not in summaries]
    if missing:
        raise SystemExit(f"no finished many-shot run of {', '.join(missing)} in these folders.")

    seeds = sorted({int(s) for m in methods for s in summaries[m]})
    print(f"| many-shot, seeds {', '.join(map(str, seeds))} | {' | '.join(tasks)} | Avg | Worst |")
    print("|---" * (len(tasks) + 3) + "|")
    for method in methods:
        aggregate = report["aggregate"][f"many_shot/{method}"]
        cells = [f"{aggregate['normalized'][t]['mean']:.3f}" for t in tasks]
        cells += [mean_sd_cell(aggregate[f]) for f in ("average", "worst")]
        print(f"| {method} ({aggregate['average']['n']} seeds) | {' | '.join(cells)} |")

    print(
        f"\n| {args.a} - B | seeds | Δ Avg (per seed) | Δ Worst (per seed) | wins (Avg, Worst) | paired t (Avg, Worst) |"
    )
    print("|---|---|---|---|---|---|")
    for other in args.b:
        common = sorted(set(summaries[args.a]) & set(summaries[other]), key=int)
        diffs = {
            f: [summaries[args.a][s][f] - summaries[other][s][f] for s in common]
            for f in ("average", "worst")
        }
        per_seed = {f: ", ".join(f"{d:+.3f}" for d in diffs[f]) for f in diffs}
        wins = ", ".join(f"{sum(d > 0 for d in diffs[f])}/{len(common)}" for f in diffs)
        t_values = ", ".join(f"{paired_t(diffs[f]):.1f}" for f in diffs)
        print(
            f"| {other} | {','.join(common)} | {mean_sd_cell(mean_sd(diffs['average']), signed=True)} ({per_seed['average']}) "
            f"| {mean_sd_cell(mean_sd(diffs['worst']), signed=True)} ({per_seed['worst']}) | {wins} | {t_values} |"
        )


if __name__ == "__main__":
    main()
