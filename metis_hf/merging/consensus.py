"""ConsensusTA (TALL masks, Wang et al. 2024) and METIS (Im et al. 2026), docs/method.md §3-4.

Both weight the task vectors, sum them (V), give each task a mask of the coordinates it "owns"
(its weighted entry is large against the rest of the sum), and keep only coordinates owned by at
least ``k`` tasks. They differ in where the weights come from (user weights vs. a softmax of loss
gaps), in the comparison (TALL's ``>=`` vs. METIS's strict ``>``), and in the final factor.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from metis_hf.merging import fused
from metis_hf.merging.checks import (
    check_convex_weights,
    check_delta,
    check_finite_number,
    check_k,
    check_positive,
    check_weights,
)
from metis_hf.merging.chunks import as_column, chunked_merge
from metis_hf.merging.registry import register_merge_method


def consensus_merge(
    task_vectors: Sequence[torch.Tensor],
    weights: Sequence[float],
    delta: float,
    k: int,
    scale: float,
    strict: bool,
) -> torch.Tensor:
    """``scale * [#{t: |w_t v_t| (>|>=) delta |V - w_t v_t|} >= k] * V`` with ``V = sum_t w_t v_t``."""
    if fused.fusable(task_vectors):
        return fused.consensus(task_vectors, weights, delta, k, scale, strict)
    w = as_column(weights, task_vectors[0])
    compare = torch.gt if strict else torch.ge

    def kernel(stacked: torch.Tensor, where: slice) -> torch.Tensor:
        weighted = stacked * w
        total = weighted.sum(0)
        owned = compare(weighted.abs(), (total - weighted).abs_().mul_(delta))
        keep = owned.sum(0) >= k
        return torch.where(keep, total * scale, 0.0)

    return chunked_merge(task_vectors, kernel)


@register_merge_method(
    "consensus_ta",
    pretty_name="Consensus Task Arithmetic (TALL masks)",
    reference_url="https://arxiv.org/abs/2405.07813",
    description="ConsensusTA (TALL masks): task arithmetic restricted to the coordinates that at least "
    "k tasks own.",
    sums_tasks=True,
)
def consensus_ta(
    task_vectors: Sequence[torch.Tensor],
    *,
    weights: Sequence[float] | None = None,
    delta: float = 0.3,
    k: int = 2,
    scale: float = 1.0,
) -> torch.Tensor:
    """Consensus Task Arithmetic: TALL masks (>=), keep coordinates owned by >= k tasks, times scale."""
    weights = check_weights(weights, len(task_vectors))
    return consensus_merge(
        task_vectors,
        weights,
        delta=check_delta(delta),
        k=check_k(k, len(task_vectors)),
        scale=check_finite_number(scale, "scale"),
        strict=False,
    )


def loss_gap_weights(loss_gaps: Sequence[float], temperature: float) -> list[float]:
    """METIS's alpha = softmax(gaps / temperature); gaps may be negative and are not clipped."""
    gaps = [check_finite_number(g, "loss_gaps entry") for g in loss_gaps]
    temperature = check_positive(temperature, "temperature")
    top = max(gaps)
    exps = [math.exp((g - top) / temperature) for g in gaps]
    total = sum(exps)
    return [e / total for e in exps]


def gap_weights(
    method: str,
    count: int,
    loss_gaps: Sequence[float] | None,
    alphas: Sequence[float] | None,
    from_gaps: Callable[[list[float]], list[float]],
) -> list[float]:
    """The per-task weights of a loss-gap method: ``from_gaps(loss_gaps)``, or ``alphas`` as given."""
    if (loss_gaps is None) == (alphas is None):
        raise ValueError(
            f"{method} needs exactly one of loss_gaps (per task) or alphas (precomputed weights)."
        )
    if alphas is None:
        return from_gaps(check_weights(loss_gaps, count, "loss_gaps"))
    return check_convex_weights(check_weights(alphas, count, "alphas"))


def _metis_weights(params: dict, count: int) -> list[float]:
    if params.get("alphas") is not None:
        return [float(a) for a in params["alphas"]]
    return loss_gap_weights(params["loss_gaps"], params["temperature"])


@register_merge_method(
    "metis",
    pretty_name="METIS",
    reference_url="https://arxiv.org/abs/2606.16501",
    description="METIS (loss-gap balancing): each round, every task's weight is a softmax of its loss gap "
    "(the merged model's validation loss minus the task adapter's) over a temperature, and only "
    "coordinates that at least k tasks own (TALL-style masks with threshold delta) are kept.",
    task_weights=_metis_weights,
)
def metis(
    task_vectors: Sequence[torch.Tensor],
    *,
    loss_gaps: Sequence[float] | None = None,
    alphas: Sequence[float] | None = None,
    temperature: float = 2.0,
    delta: float = 0.3,
    k: int = 2,
    beta: float = 1.0,
) -> torch.Tensor:
    """METIS: loss-gap softmax weights, strict TALL masks, consensus >= k, times beta (paper defaults)."""
    count = len(task_vectors)
    check_positive(temperature, "temperature")
    alphas = gap_weights("metis", count, loss_gaps, alphas, lambda gaps: loss_gap_weights(gaps, temperature))
    return consensus_merge(
        task_vectors,
        alphas,
        delta=check_delta(delta),
        k=check_k(k, count),
        scale=check_finite_number(beta, "beta"),
        strict=True,
    )
