"""Scores that combine tasks, through the ``evaluate`` metric modules shipped in metis_hf/metrics.

``evaluate.load(name)`` fetches metric scripts from the Hub; these modules are loaded by their local
path instead, so they work offline and always match the installed metis-hf.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

METRICS = ("normalized_score", "multitask_summary")


def metric_path(name: str) -> Path:
    if name not in METRICS:
        raise ValueError(f"Unknown metric {name!r}; metis-hf ships {', '.join(METRICS)}.")
    return Path(str(resources.files("metis_hf") / "metrics" / name))


@functools.cache
def load_metric(name: str):
    """The ``evaluate`` module ``name`` from metis-hf's own folder (never the Hub)."""
    import evaluate

    return evaluate.load(str(metric_path(name)))


def summarize(
    scores: Mapping[str, float],
    experts: Mapping[str, float] | None = None,
    weights: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """Per-task ``normalized`` scores (``scores / experts``; the raw scores when ``experts`` is None)
    with their ``average``, ``worst`` task and ``gap`` (worst - average)."""
    tasks = list(scores)
    if not tasks:
        raise ValueError("summarize: no task scores.")
    values: Sequence[float] = [float(scores[t]) for t in tasks]
    if experts is not None:
        missing = [t for t in tasks if t not in experts]
        if missing:
            raise ValueError(f"summarize: no expert score for task {missing[0]!r}.")
        values = load_metric("normalized_score").compute(
            predictions=values, references=[float(experts[t]) for t in tasks]
        )["normalized_scores"]
    task_weights = None if weights is None else [float(weights.get(t, 1.0)) for t in tasks]
    summary = load_metric("multitask_summary").compute(predictions=list(values), weights=task_weights)
    worst_value = summary["worst"]
    return {
        "normalized": dict(zip(tasks, values)),
        "worst_task": next((t for t, v in zip(tasks, values) if v == worst_value), None),
        **summary,
    }
