"""How sure a compare's verdicts are: intervals over test items, and a paired test over seeds.

- **Items.** Every run of a compare is scored on the same test items, so one bootstrap replicate
  resamples each task's items once (with replacement) and rescores every run, expert and seed on
  that sample: merged/expert ratios, Avg, Worst and the differences between two methods keep their
  pairing. The 95% interval is the 2.5-97.5 percentile range over the replicates. A replicate in
  which an expert scores 0 leaves that task's ratio undefined (as the report does), and a
  statistic left undefined in a replicate is dropped from the percentiles.
- **Seeds.** The per-seed differences of two methods are tested by an exact sign-flip
  permutation test (every assignment of signs to the seeds' differences): no distribution is
  assumed, and with 3 seeds the smallest two-sided p it can give is 0.25.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from metis_hf.scoring import get_metric

REPLICATES = 2000


def item_values(run: Mapping[str, Any], task: str, metric: str) -> np.ndarray | None:
    """A run's per-item values of ``metric`` on ``task`` (None where it has none)."""
    values = run["scores"].get(task, {}).get(get_metric(metric).item_field)
    return np.asarray(values, dtype=np.float64) if values else None


def average_and_worst(normalized: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row of ``normalized`` (replicates x tasks): the weighted mean over the defined tasks and
    the lowest defined task of positive weight, as ``multitask_summary`` computes them (nan where no
    task is defined)."""
    defined = ~np.isnan(normalized)
    values = np.where(defined, normalized, 0.0)
    total = (defined * weights).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        average = (values * weights).sum(axis=1) / total
    candidates = np.where(defined & (weights > 0), normalized, np.inf)
    worst = candidates.min(axis=1)
    worst[np.isinf(worst)] = np.nan
    return average, worst


def bootstrap_replicates(
    runs: Sequence[Mapping[str, Any]],
    experts: Mapping[int, Mapping[str, Any]],
    tasks: Sequence[str],
    metric: str,
    weights: Mapping[str, float] | None = None,
    replicates: int = REPLICATES,
    seed: int = 0,
) -> dict[tuple[str, str, int], dict[str, np.ndarray]] | None:
    """Per merged run, keyed (kind, method, seed): its normalized scores (replicates x tasks),
    Avg and Worst in each bootstrap replicate. None when a run or expert lacks per-item values
    (harness tasks, result files written before they were recorded) or the item counts differ."""
    counts = {}
    for task in tasks:
        sizes = set()
        for run in [*runs, *experts.values()]:
            items = item_values(run, task, metric)
            if items is None:
                return None
            sizes.add(len(items))
        if len(sizes) != 1:
            return None
        counts[task] = sizes.pop()
    rng = np.random.default_rng(seed)
    samples = {t: rng.integers(0, n, size=(replicates, n)) for t, n in counts.items()}

    def rescored(run: Mapping[str, Any]) -> np.ndarray:  # replicates x tasks
        return np.stack([item_values(run, t, metric)[samples[t]].mean(axis=1) for t in tasks], axis=1)

    expert_scores = {seed: rescored(run) for seed, run in experts.items()}
    task_weights = np.asarray([float((weights or {}).get(t, 1.0)) for t in tasks])
    out = {}
    for run in runs:
        with np.errstate(invalid="ignore", divide="ignore"):
            ratio = rescored(run) / expert_scores[run["seed"]]
        ratio[~np.isfinite(ratio)] = np.nan  # an expert at 0: undefined, as in normalized_score
        average, worst = average_and_worst(ratio, task_weights)
        out[(run["kind"], run["method"], run["seed"])] = {
            "normalized": ratio,
            "average": average,
            "worst": worst,
        }
    return out


def interval(values: np.ndarray) -> list[float]:
    """The 95% percentile interval of the defined replicates ([nan, nan] when none is)."""
    defined = values[~np.isnan(values)]
    if defined.size == 0:
        return [math.nan, math.nan]
    low, high = np.percentile(defined, [2.5, 97.5])
    return [float(low), float(high)]


def paired_gains(
    before: Mapping[str, Sequence[float]],
    after: Mapping[str, Sequence[float]],
    replicates: int = REPLICATES,
    seed: int = 0,
) -> dict[str, tuple[float, float, float]]:
    """Per task, and over tasks (key ``"mean"``), the gain of ``after`` over ``before`` on the same
    test items (per-item values of each), with its 95% paired-bootstrap interval: (gain, low, high).
    Each replicate resamples every task's items once; the mean is over tasks within a replicate."""
    rng = np.random.default_rng(seed)
    out, replicated = {}, []
    for task, items in before.items():
        a, b = np.asarray(items, dtype=np.float64), np.asarray(after[task], dtype=np.float64)
        if a.shape != b.shape or a.size == 0:
            raise ValueError(
                f"{task}: the two models were scored on different items ({a.size} and {b.size})."
            )
        sample = rng.integers(0, a.size, size=(replicates, a.size))
        gains = (b[sample] - a[sample]).mean(axis=1)
        replicated.append(gains)
        out[task] = (float((b - a).mean()), *interval(gains))
    if replicated:
        out["mean"] = (float(np.mean([g[0] for g in out.values()])), *interval(np.mean(replicated, axis=0)))
    return out


def sign_flip_p(differences: Sequence[float]) -> float:
    """Two-sided exact p of the paired sign-flip test: the share of the 2^n sign assignments whose
    mean is at least as far from 0 as the observed one (nan for no seeds)."""
    if not differences:
        return math.nan
    observed = abs(sum(differences)) - 1e-12
    flips = list(itertools.product((1, -1), repeat=len(differences)))
    extreme = sum(abs(sum(s * d for s, d in zip(signs, differences))) >= observed for signs in flips)
    return extreme / len(flips)


def verdict(low: float, high: float) -> str:
    """'A' or 'B' when the interval of A - B excludes 0 on that side, else 'tie'."""
    if math.isnan(low) or math.isnan(high) or low <= 0 <= high:
        return "tie"
    return "A" if low > 0 else "B"
