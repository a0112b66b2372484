"""TIES (Yadav et al. 2023): trim by magnitude, elect a sign per coordinate, disjoint mean.

Conventions (as PEFT's ``merge_utils.ties``): each task vector keeps its ``k = int(density * n)``
largest magnitudes; the sign is elected on the *unweighted* trimmed vectors (sum >= 0 elects +);
the merged entry is the sum of the *weighted* entries that agree with the elected sign, divided by
how many agree (at least 1), times ``scale``. mergekit elects on the weighted entries and divides
by the summed weights of the agreeing inputs: with unit weights all three agree exactly.

Ties at the threshold: every entry whose magnitude equals the k-th largest is kept, so a task may
keep more than k entries; PEFT's and mergekit's ``topk`` keep exactly k and choose among the tied
entries by position. Keeping all ties makes the result independent of the entries' order (and
exact in bfloat16, where ties are common); without ties the three agree.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from metis_hf.merging import fused
from metis_hf.merging.checks import check_density, check_finite_number, check_weights
from metis_hf.merging.chunks import CHUNK_ELEMENTS, as_column, chunked_merge
from metis_hf.merging.registry import register_merge_method

_SAMPLE = 1 << 15  # magnitudes sampled to bracket the threshold


def magnitude_threshold(vector: torch.Tensor, density: float) -> float:
    """The smallest magnitude among the ``int(density * n)`` largest: ``|v| >= t`` keeps them.

    Exact (the same value as ``kthvalue``), but instead of a full selection it brackets the
    threshold with quantiles of a strided sample, counts in one chunked pass how many magnitudes
    fall below the bracket, and selects inside the bracket only; it falls back to ``kthvalue``
    if the bracket misses. Returns 0.0 (keep all) or ``inf`` (keep none) at the extremes.
    """
    flat = vector.reshape(-1)
    n = flat.numel()
    keep = int(density * n)
    if keep >= n:
        return 0.0
    if keep == 0:
        return math.inf
    rank = n - keep + 1  # 1-based ascending rank of the smallest kept magnitude
    if n <= 4 * _SAMPLE:
        return float(flat.abs().kthvalue(rank).values)
    sample = flat[:: n // _SAMPLE].abs().float().sort().values
    s = sample.numel()
    margin = 5.0 / math.sqrt(s)  # several standard errors of a sample quantile
    low_index = math.floor((rank / n - margin) * s)
    high_index = math.ceil((rank / n + margin) * s)
    low = float(sample[low_index]) if low_index > 0 else 0.0
    high = float(sample[high_index]) if high_index < s else math.inf
    if fused.fusable([flat]):
        below, candidates = fused.magnitude_bracket(flat, low, high)
    else:
        below, inside = 0, []
        for start in range(0, n, CHUNK_ELEMENTS):
            magnitudes = flat[start : start + CHUNK_ELEMENTS].abs()
            at_least_low = magnitudes >= low
            below += magnitudes.numel() - int(at_least_low.sum())
            inside.append(magnitudes[at_least_low & (magnitudes <= high)])
        candidates = torch.cat(inside)
    if below < rank <= below + candidates.numel():
        return float(candidates.kthvalue(rank - below).values)
    return float(flat.abs().kthvalue(rank).values)  # the sample was unrepresentative


def elect_and_average(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Sign election on ``values`` [T, c] and the weighted mean of the agreeing entries.

    Zeros never agree (they were trimmed or dropped), so they are not counted.
    """
    positive = values.sum(0) >= 0
    agree = torch.where(positive, values > 0, values < 0)
    kept = values * agree
    count = agree.sum(0).clamp_(min=1)
    return (weights.T @ kept).squeeze(0) / count


@register_merge_method(
    "ties",
    pretty_name="TIES",
    reference_url="https://arxiv.org/abs/2306.01708",
    description="TIES: each task vector trimmed to its largest entries, a sign elected per coordinate, and "
    "the agreeing entries averaged.",
)
def ties(
    task_vectors: Sequence[torch.Tensor],
    *,
    weights: Sequence[float] | None = None,
    density: float = 0.2,
    scale: float = 1.0,
) -> torch.Tensor:
    """TIES-Merging: trim to the top `density` magnitudes, elect signs, disjoint mean, times scale."""
    weights = check_weights(weights, len(task_vectors))
    density = check_density(density)
    scale = check_finite_number(scale, "scale")
    thresholds = [magnitude_threshold(v, density) for v in task_vectors]
    if fused.fusable(task_vectors):
        return fused.ties(task_vectors, thresholds, weights, scale)
    thresholds = as_column(thresholds, task_vectors[0])
    w = as_column(weights, task_vectors[0])

    def kernel(stacked: torch.Tensor, where: slice) -> torch.Tensor:
        trimmed = stacked * (stacked.abs() >= thresholds)
        return elect_and_average(trimmed, w).mul_(scale)

    return chunked_merge(task_vectors, kernel)
