"""Normalized score: a merged model's score on each task divided by its expert's score there.

An ``evaluate`` metric module shipped inside metis-hf and loaded by local path, so it works offline
(``evaluate.load("accuracy")`` would fetch a script from the Hub). The METIS paper reports merges
in this unit: 1.0 means the merged model matches the individually fine-tuned expert on that task.
"""

import math

import datasets
import evaluate

_DESCRIPTION = "Per-task ratio merged score / expert score (the METIS paper's normalized performance)."
_KWARGS = """
Args:
    predictions: the merged model's score on each task, in task order.
    references: the expert's score on the same tasks, same order.
Returns:
    normalized_scores: list of merged / expert per task; NaN where the expert scored 0 (undefined).
"""
_CITATION = """@inproceedings{im2026metis,
  title={Post-Hoc Merging is Not Enough: Many-Shot Model Merging with Loss-Gap Balancing},
  author={Im, K. and Kim, M. and Eom, C. and Kwon, M.},
  booktitle={International Conference on Machine Learning (ICML)},
  year={2026}
}"""


class NormalizedScore(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS,
            features=datasets.Features(
                {"predictions": datasets.Value("float64"), "references": datasets.Value("float64")}
            ),
        )

    def _compute(self, predictions, references):
        ratios = []
        for merged, expert in zip(predictions, references):
            if merged is None or expert is None or math.isnan(merged) or math.isnan(expert):
                raise ValueError("normalized_score: scores must be numbers, got NaN or None.")
            ratios.append(merged / expert if expert != 0 else math.nan)
        return {"normalized_scores": ratios}
