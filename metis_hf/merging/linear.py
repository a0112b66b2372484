"""Task Arithmetic: ``scale * sum_t weights_t * tau_t``."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from metis_hf.merging import fused
from metis_hf.merging.checks import check_finite_number, check_weights
from metis_hf.merging.chunks import compute_dtype
from metis_hf.merging.registry import register_merge_method


def weighted_sum(task_vectors: Sequence[torch.Tensor], coefficients: Sequence[float]) -> torch.Tensor:
    """sum_t c_t * v_t in one output buffer: T reads and one write, no stacked copy."""
    if fused.fusable(task_vectors):
        return fused.weighted_sum(task_vectors, coefficients)
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


def _fedavg_weights(params: dict, count: int) -> list[float]:
    counts = check_weights(params["example_counts"], count, "example_counts")
    if any(c < 0 for c in counts) or not sum(counts) > 0:
        raise ValueError(f"example_counts must be >= 0 with a positive sum, got {list(counts)}.")
    return [c / sum(counts) for c in counts]


@register_merge_method(
    "fedavg",
    pretty_name="FedAvg",
    reference_url="https://arxiv.org/abs/1602.05629",
    description="FedAvg: the mean of the task vectors weighted by each task's number of training "
    "examples (the federated-learning loop of OpenFedLLM and FlowerTune, run many-shot).",
    task_weights=_fedavg_weights,
)
def fedavg(
    task_vectors: Sequence[torch.Tensor], *, example_counts: Sequence[float] | None = None
) -> torch.Tensor:
    """FedAvg (McMahan et al. 2017): sum_t n_t tau_t / sum_t n_t (uniform without counts)."""
    counts = [1.0] * len(task_vectors) if example_counts is None else example_counts
    return weighted_sum(task_vectors, _fedavg_weights({"example_counts": counts}, len(task_vectors)))
