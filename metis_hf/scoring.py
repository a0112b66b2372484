"""The per-item metrics a generated answer is scored on, in one registry.

Each metric names its per-item function and where a ``TaskScore`` keeps its values: the task's
value is the mean over its items, and the report's intervals resample the items. Scoring, the
intervals, recipes (``compare.metric``), reports and ``metis-hf eval --metric`` read this registry.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from metis_hf.data import Task


def exact_match(prediction: str, answer: str) -> float:
    """1.0 when the answer equals the gold answer up to whitespace."""
    return float(" ".join(prediction.split()) == " ".join(str(answer).split()))


@dataclass(frozen=True)
class Metric:
    name: str  # its key in results files and tables
    item_field: str  # the TaskScore list of its per-item values
    of_item: Callable[[Task, str, Mapping[str, Any]], float]  # (task, answer, item) -> value
    help: str


METRICS = {
    metric.name: metric
    for metric in (
        Metric(
            "score",
            "item_scores",
            lambda task, answer, item: float(task.score(answer, item)),
            "the task's own checker (partial credit where the task gives it; exact match otherwise)",
        ),
        Metric(
            "exact_match",
            "item_exact_matches",
            lambda task, answer, item: exact_match(answer, item["answer"]),
            "the answer equals the gold answer, whitespace normalized",
        ),
    )
}


def get_metric(name: str) -> Metric:
    if name not in METRICS:
        raise ValueError(f"Unknown metric {name!r}; choose one of {', '.join(METRICS)}.")
    return METRICS[name]
