"""Task Arithmetic: ``scale * sum_t weights_t * tau_t``."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from metis_hf.merging.checks import check_finite_number, check_weights
from metis_hf.merging.chunks import compute_dtype
from metis_hf.merging.registry import register_merge_method


def weighted_sum(task_vectors: Sequence[torch.Tensor], coefficients: Sequence[float]) -> torch.Tensor:
    """sum_t c_t * v_t in one output buffer: T reads and one write, no stacked copy."""
    first = task_vectors[0]
    work = compute_dtype(first.dtype)
    out = task_vectors[0].to(work) * coefficients[0]
    for vector, c in zip(task_vectors[1:], coefficients[1:]):
        out.add_(vector, alpha=c)
    return out.to(first.dtype)


@register_merge_method(
    "task_arithmetic",
    pretty_name="Task Arithmetic",
    reference_url="https://arxiv.org/abs/2212.04089",
    description="Task Arithmetic: a scaled sum of the task vectors.",
    sums_tasks=True,
)
def task_arithmetic(
    task_vectors: Sequence[torch.Tensor], *, weights: Sequence[float] | None = None, scale: float = 1.0
) -> torch.Tensor:
    """Task Arithmetic (Ilharco et al. 2023): scale * sum_t weights_t * tau_t."""
    weights = check_weights(weights, len(task_vectors))
    scale = check_finite_number(scale, "scale")
    return weighted_sum(task_vectors, [scale * w for w in weights])
