"""``metis_robust``: METIS with weights and masks that hold for any task count and loss scale.

Three changes to the paper's ``metis`` (which stays exact; why: docs/merging.md, "metis_robust"):

1. scale-free gaps: relative, ``g_t / L_merged_t`` (the default); standardized,
   ``(g_t - mean g) / sd g``; or erased, the share of the task's achievable gain that the merge has
   lost, ``g_t / (L_base_t - L_local_t)`` (``L_local_t = L_merged_t - g_t``), clipped to [0, 1];
2. a floor on the weights: ``alpha = floor + (1 - T * floor) * softmax(gaps / temperature)``,
   default floor ``0.5 / T``;
3. a mask on each task's *unweighted* vector against the weighted merge V:
   ``m_t = |v_t| >= delta * |V - v_t|``, so identical task vectors pass for every T and alpha.

The merge is ``beta * [#{t: m_t} >= k] * V``, a masked convex combination.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from metis_hf.merging import fused
from metis_hf.merging.checks import check_delta, check_finite_number, check_k, check_positive, check_weights
from metis_hf.merging.chunks import as_column, chunked_merge
from metis_hf.merging.consensus import gap_weights
from metis_hf.merging.registry import register_merge_method

GAP_NORMALIZATIONS = ("relative", "standardized", "erased")
DEFAULT_TEMPERATURES = {"relative": 0.1, "standardized": 1.0, "erased": 0.1}


def robust_weights(
    loss_gaps: Sequence[float],
    reference_losses: Sequence[float] | None,
    temperature: float | None = None,
    floor: float | None = None,
    gap_normalization: str = "relative",
    base_losses: Sequence[float] | None = None,
) -> list[float]:
    """Floored softmax of the scale-free gaps: ``g_t / L_t`` under ``"relative"`` (raw gaps when no
    reference losses), ``(g_t - mean) / sd`` under ``"standardized"`` (reference losses unused),
    the erased share of each task's gain under ``"erased"`` (needs the merged model's losses as
    ``reference_losses`` and the base model's as ``base_losses``). The default temperature suits
    each: 0.1 for relative gaps and erased shares (fractions), 1 for standardized ones (units of the
    gaps' spread)."""
    count = len(loss_gaps)
    gaps = [check_finite_number(g, "loss_gaps entry") for g in loss_gaps]
    if gap_normalization not in GAP_NORMALIZATIONS:
        raise ValueError(f"gap_normalization must be one of {GAP_NORMALIZATIONS}, got {gap_normalization!r}.")
    if gap_normalization == "standardized":
        mean = sum(gaps) / count
        spread = math.sqrt(sum((g - mean) ** 2 for g in gaps) / count)
        # Equal gaps carry no ranking: uniform weights rather than a division by zero.
        gaps = [(g - mean) / spread if spread > 0 else 0.0 for g in gaps]
    elif gap_normalization == "erased":
        gaps = erased_shares(gaps, reference_losses, base_losses)
    elif reference_losses is not None:
        losses = check_weights(reference_losses, count, "reference_losses")
        if any(loss <= 0 for loss in losses):
            raise ValueError(f"reference_losses must be positive, got {list(losses)}.")
        gaps = [g / loss for g, loss in zip(gaps, losses)]
    if temperature is None:
        temperature = DEFAULT_TEMPERATURES[gap_normalization]
    temperature = check_positive(temperature, "temperature")
    floor = 0.5 / count if floor is None else check_finite_number(floor, "floor")
    if not 0 <= floor <= 1 / count:
        raise ValueError(f"floor must lie in [0, 1/T] = [0, {1 / count:.4g}], got {floor}.")
    top = max(gaps)
    exps = [math.exp((g - top) / temperature) for g in gaps]
    total = sum(exps)
    return [floor + (1 - count * floor) * e / total for e in exps]


def erased_shares(
    loss_gaps: Sequence[float],
    merged_losses: Sequence[float] | None,
    base_losses: Sequence[float] | None,
) -> list[float]:
    """Per task, the share of its achievable gain that the merge has lost:
    ``(L_merged - L_local) / (L_base - L_local)`` with ``L_local = L_merged - gap``, clipped to
    [0, 1]. A task whose adapter is no better than the base has nothing to lose: share 0."""
    count = len(loss_gaps)
    if merged_losses is None or base_losses is None:
        raise ValueError(
            "gap_normalization 'erased' needs reference_losses (the merged model's) and base_losses "
            "(the base model's) per task."
        )
    merged = check_weights(merged_losses, count, "reference_losses")
    base = check_weights(base_losses, count, "base_losses")
    shares = []
    for gap, merged_loss, base_loss in zip(loss_gaps, merged, base):
        achievable = base_loss - (merged_loss - gap)
        shares.append(min(max(gap / achievable, 0.0), 1.0) if achievable > 0 else 0.0)
    return shares


def _robust_weights(params: dict, count: int) -> list[float]:
    if params.get("alphas") is not None:
        return [float(a) for a in params["alphas"]]
    keys = ("loss_gaps", "reference_losses", "temperature", "floor", "gap_normalization", "base_losses")
    return robust_weights(*(params.get(key) for key in keys))


def _per_round(value: Any) -> list[Any]:
    """A setting's values over rounds: many-shot runs may give a list, one value per round."""
    return list(value) if isinstance(value, (list, tuple)) else [value]


@register_merge_method(
    "metis_robust",
    pretty_name="METIS, robust weights and mask (metis-hf)",
    reference_url="https://arxiv.org/abs/2606.16501",
    description="METIS with scale-free (relative, standardized or erased-share) loss gaps, a floor "
    "on every task's weight, and a mask that asks whether each task's own vector agrees with the merge; only "
    "coordinates that at least k tasks agree on are kept.",
    task_weights=_robust_weights,
    reads_base_losses=lambda params: "erased" in _per_round(params["gap_normalization"]),
)
def metis_robust(
    task_vectors: Sequence[torch.Tensor],
    *,
    loss_gaps: Sequence[float] | None = None,
    reference_losses: Sequence[float] | None = None,
    base_losses: Sequence[float] | None = None,
    alphas: Sequence[float] | None = None,
    temperature: float | None = None,
    floor: float | None = None,
    gap_normalization: str = "relative",
    delta: float = 0.3,
    k: int = 2,
    beta: float = 1.0,
) -> torch.Tensor:
    """METIS with relative, floored loss-gap weights and a mask on unweighted task vectors."""
    count = len(task_vectors)
    alphas = gap_weights(
        "metis_robust",
        count,
        loss_gaps,
        alphas,
        lambda gaps: robust_weights(
            gaps, reference_losses, temperature, floor, gap_normalization, base_losses
        ),
    )
    delta, k, beta = check_delta(delta), check_k(k, count), check_finite_number(beta, "beta")
    if fused.fusable(task_vectors):
        return fused.consensus(task_vectors, alphas, delta, k, beta, strict=False, weighted_mask=False)
    w = as_column(alphas, task_vectors[0])

    def kernel(stacked: torch.Tensor, where: slice) -> torch.Tensor:
        merged = (stacked * w).sum(0)
        agrees = stacked.abs() >= (merged - stacked).abs_().mul_(delta)
        keep = agrees.sum(0) >= k
        return torch.where(keep, merged * beta, 0.0)

    return chunked_merge(task_vectors, kernel)
