"""DARE (Yu et al. 2024): drop each entry with probability ``1 - density``, rescale survivors by
``1 / density`` (as PEFT; mergekit matches L1 norms instead), then Task Arithmetic (dare_linear)
or TIES's sign election and disjoint mean (dare_ties).

Reproducible from ``seed``: an integer draws every task's mask from one generator, task after
task, exactly as PEFT does under ``torch.manual_seed(seed)``; a list gives each task its own
seed, so permuting tasks together with their seeds permutes nothing in the result.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from metis_hf.merging import fused
from metis_hf.merging.checks import check_density, check_finite_number, check_seed, check_weights
from metis_hf.merging.chunks import CHUNK_ELEMENTS, as_column, chunked_merge
from metis_hf.merging.registry import register_merge_method
from metis_hf.merging.ties import elect_and_average

Seed = int | Sequence[int] | None


def keep_masks(task_vectors: Sequence[torch.Tensor], density: float, seed: Seed) -> list[torch.Tensor]:
    """One flat boolean keep-mask per task, drawn task after task in chunks.

    ``rand < density`` is the draw ``torch.bernoulli(full(density))`` makes, and drawing in
    chunks from one generator yields the same stream as one draw over the whole tensor, without a
    full-size float buffer.
    """
    count = len(task_vectors)
    device = task_vectors[0].device
    seed = check_seed(seed, count)
    if seed is None or isinstance(seed, int):
        shared = torch.Generator(device=device)
        if seed is None:
            shared.seed()
        else:
            shared.manual_seed(seed)
        generators = [shared] * count
    else:
        generators = [torch.Generator(device=device).manual_seed(s) for s in seed]
    n = task_vectors[0].numel()
    masks = [torch.empty(n, dtype=torch.bool, device=device) for _ in range(count)]
    for mask, generator in zip(masks, generators):
        for start in range(0, n, CHUNK_ELEMENTS):
            size = min(CHUNK_ELEMENTS, n - start)
            torch.lt(
                torch.rand(size, generator=generator, device=device), density, out=mask[start : start + size]
            )
    return masks


def _dare(
    task_vectors: Sequence[torch.Tensor],
    weights: Sequence[float] | None,
    density: float,
    scale: float,
    seed: Seed,
    combine: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Drop and rescale each chunk with the tasks' masks, then ``combine(dropped, weights)``."""
    weights = check_weights(weights, len(task_vectors))
    density = check_density(density)
    scale = check_finite_number(scale, "scale")
    masks = keep_masks(task_vectors, density, seed)
    if fused.fusable(task_vectors):
        return fused.dare(task_vectors, masks, density, weights, scale, elect=combine is elect_and_average)
    w = as_column(weights, task_vectors[0])

    def kernel(stacked: torch.Tensor, where: slice) -> torch.Tensor:
        keep = torch.stack([mask[where] for mask in masks])
        return combine(stacked * keep / density, w).mul_(scale)

    return chunked_merge(task_vectors, kernel)


@register_merge_method(
    "dare_linear",
    pretty_name="DARE (linear)",
    reference_url="https://arxiv.org/abs/2311.03099",
    description="DARE: entries dropped at random and the survivors rescaled, then summed.",
    sums_tasks=True,
)
def dare_linear(
    task_vectors: Sequence[torch.Tensor],
    *,
    weights: Sequence[float] | None = None,
    density: float = 0.5,
    scale: float = 1.0,
    seed: Seed = None,
) -> torch.Tensor:
    """DARE + Task Arithmetic: random drop with rescale 1/density, weighted sum, times scale."""
    return _dare(task_vectors, weights, density, scale, seed, lambda dropped, w: (w.T @ dropped).squeeze(0))


@register_merge_method(
    "dare_ties",
    pretty_name="DARE + TIES",
    reference_url="https://arxiv.org/abs/2311.03099",
    description="DARE + TIES: entries dropped at random and the survivors rescaled, then TIES's sign "
    "election and disjoint mean.",
)
def dare_ties(
    task_vectors: Sequence[torch.Tensor],
    *,
    weights: Sequence[float] | None = None,
    density: float = 0.5,
    scale: float = 1.0,
    seed: Seed = None,
) -> torch.Tensor:
    """DARE + TIES: random drop with rescale 1/density, sign election, disjoint mean, times scale."""
    return _dare(task_vectors, weights, density, scale, seed, elect_and_average)
