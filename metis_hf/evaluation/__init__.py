"""Evaluation: per-task accuracy by generation, per-task loss, and combined scores."""

from metis_hf.evaluation.generation import (
    TaskScore,
    format_score_table,
    generate_answers,
    most_common_answer,
    score_task,
    score_tasks,
)

__all__ = [
    "TaskScore",
    "format_score_table",
    "generate_answers",
    "most_common_answer",
    "score_task",
    "score_tasks",
]
