"""Multi-task summary: average, worst task, and worst minus average of per-task scores.

An ``evaluate`` metric module shipped inside metis-hf and loaded by local path (works offline).
METIS's headline claim is on the worst task, so the gap (worst - average, never positive) is
reported beside the average. ``weights`` give a weighted average, as the paper's Avg counts its
multilingual task three times ((instr + math + 3 * multilingual + safety) / 6).
NaN scores (a task whose expert scored 0) are left out and counted in ``undefined_tasks``; with
no defined score, average, worst and gap are NaN.
"""

import math

import datasets
import evaluate

_DESCRIPTION = "Average, worst task and worst-minus-average over per-task (normalized) scores."
_KWARGS = """
Args:
    predictions: one score per task.
    weights: optional weight per task for the average (default: equal).
Returns:
    average, worst, gap (worst - average), undefined_tasks (NaN scores left out).
"""


class MultitaskSummary(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Value("float64")}),
        )

    def _compute(self, predictions, weights=None):
        weights = [1.0] * len(predictions) if weights is None else [float(w) for w in weights]
        if len(weights) != len(predictions):
            raise ValueError(f"multitask_summary: {len(weights)} weights for {len(predictions)} scores.")
        if any(w < 0 for w in weights) or not any(w > 0 for w in weights):
            raise ValueError("multitask_summary: weights must be non-negative with a positive sum.")
        kept = [(p, w) for p, w in zip(predictions, weights) if p is not None and not math.isnan(p)]
        if not kept:  # every task undefined: nothing to average, but no reason to fail a report
            return {
                "average": math.nan,
                "worst": math.nan,
                "gap": math.nan,
                "undefined_tasks": len(predictions),
            }
        total = sum(w for _, w in kept)
        average = sum(p * w for p, w in kept) / total
        worst = min(p for p, w in kept if w > 0)
        return {
            "average": average,
            "worst": worst,
            "gap": worst - average,
            "undefined_tasks": len(predictions) - len(kept),
        }
