"""Merges of each layer's update matrix through its SVD: Iso-C and Iso-CTS (Marczak et al. 2025)
and TSV-M (Gargiulo et al. 2025).

A 2-D input is a layer's update matrix Delta_t (m x n); anything else is averaged, as the authors
do. Singular directions are counted up to the numerical rank (singular values above
``s_max * max(m, n) * eps``): on full-rank updates, the authors' setting, that is every direction
and the results are theirs; a sum of LoRA updates has rank at most T * r, and the directions of its
zero singular values are arbitrary, so only the nonzero part is used (docs/merging.md). With
``_full_shape`` the inputs are the core of larger matrices (merge space ``core``): ranks,
tolerances and TSV-M's per-task budget are then those of the full matrices, so a merge in the core
equals the dense one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from metis_hf.merging.checks import check_finite_number
from metis_hf.merging.registry import register_merge_method

_PAPER_ISO = "https://arxiv.org/abs/2502.04959"
_PAPER_TSV = "https://arxiv.org/abs/2412.00081"


def _svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.linalg.svd(matrix.float(), full_matrices=False)


def _rank(singular_values: torch.Tensor, shape: tuple[int, ...]) -> int:
    """How many singular values are numerically nonzero (NumPy's ``matrix_rank`` tolerance)."""
    if singular_values.numel() == 0 or float(singular_values[0]) <= 0:
        return 0
    tolerance = singular_values[0] * max(shape) * torch.finfo(torch.float32).eps
    return int((singular_values > tolerance).sum())


def _polar(matrix: torch.Tensor) -> torch.Tensor:
    """The nearest matrix with orthonormal columns (or rows, for a wide one): ``U V^T`` of its SVD."""
    u, _, vh = _svd(matrix)
    return u @ vh


def _per_matrix(task_vectors: Sequence[torch.Tensor], scale: float, merge_matrix) -> torch.Tensor:
    """``scale * merge_matrix()`` for 2-D inputs, ``scale * mean`` otherwise, in the inputs' dtype."""
    scale = check_finite_number(scale, "scale")
    first = task_vectors[0]
    if first.ndim != 2:
        merged = torch.stack([v.float() for v in task_vectors]).mean(0)
    else:
        merged = merge_matrix()
    return (scale * merged).to(first.dtype)


@register_merge_method(
    "iso_c",
    pretty_name="Iso-C (isotropic merging in the common subspace)",
    reference_url=_PAPER_ISO,
    description="Iso-C: the sum of the task updates with every singular value of each layer set to "
    "their mean (a flat spectrum), so no task's directions dominate.",
    sums_tasks=True,
    operates_on="matrices",
)
def iso_c(
    task_vectors: Sequence[torch.Tensor],
    *,
    scale: float = 1.0,
    _full_shape: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Iso-C: ``scale * mean(S) U V^T`` of ``sum_t Delta_t`` (over its numerical rank); others averaged."""

    def merge_matrix() -> torch.Tensor:
        u, s, vh = _svd(torch.stack([v.float() for v in task_vectors]).sum(0))
        rank = _rank(s, _full_shape or tuple(task_vectors[0].shape))
        return s[:rank].mean() * (u[:, :rank] @ vh[:rank]) if rank else torch.zeros_like(u @ vh)

    return _per_matrix(task_vectors, scale, merge_matrix)


@register_merge_method(
    "iso_cts",
    pretty_name="Iso-CTS (isotropic merging in common and task-specific subspaces)",
    reference_url=_PAPER_ISO,
    description="Iso-CTS: the top singular directions of the summed updates (the common subspace) "
    "plus each task's own top directions outside it, orthonormalised, with a flat spectrum.",
    sums_tasks=True,
    operates_on="matrices",
)
def iso_cts(
    task_vectors: Sequence[torch.Tensor],
    *,
    common_space_fraction: float = 0.8,
    scale: float = 1.0,
    _full_shape: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Iso-CTS: common subspace of the sum plus per-task subspaces, polar-orthonormalised, flat spectrum."""
    fraction = check_finite_number(common_space_fraction, "common_space_fraction")
    if not 0 < fraction <= 1:
        raise ValueError(f"common_space_fraction must be in (0, 1], got {common_space_fraction}.")
    count = len(task_vectors)
    shape = _full_shape or tuple(task_vectors[0].shape)

    def merge_matrix() -> torch.Tensor:
        matrices = [v.float() for v in task_vectors]
        u, s, vh = _svd(torch.stack(matrices).sum(0))
        rank = _rank(s, shape)
        if rank == 0:
            return torch.zeros_like(u @ vh)
        # The authors' split of r directions, over the numerical rank: a common part and T equal
        # task-specific parts (round to a multiple of T).
        specific = round((rank - int(rank * fraction)) / count) * count
        common, per_task = rank - specific, specific // count
        u_common = u[:, :common]
        columns, rows, values = [u_common], [vh[:common]], [s[:common]]
        for matrix in matrices:
            residual = matrix - u_common @ (u_common.T @ matrix)
            ut, st, vt = _svd(residual)
            keep = min(per_task, _rank(st, shape))
            columns.append(ut[:, :keep])
            rows.append(vt[:keep])
            values.append(st[:keep])
        mean = torch.cat(values).mean()
        return mean * (_polar(torch.cat(columns, 1)) @ _polar(torch.cat(rows, 0)))

    return _per_matrix(task_vectors, scale, merge_matrix)


@register_merge_method(
    "tsv_m",
    pretty_name="TSV-M (task singular vectors merging)",
    reference_url=_PAPER_TSV,
    description="TSV-M: each task's top 1/T singular directions of every layer, side by side, "
    "orthonormalised (polar decomposition) to remove interference, singular values kept.",
    sums_tasks=True,
    operates_on="matrices",
)
def tsv_m(
    task_vectors: Sequence[torch.Tensor],
    *,
    scale: float = 1.0,
    _full_shape: tuple[int, int] | None = None,
) -> torch.Tensor:
    """TSV-M: per task the top min(m, n) // T singular triplets, U and V polar-orthonormalised."""
    shape = _full_shape or tuple(task_vectors[0].shape)
    budget = min(shape) // len(task_vectors)

    def merge_matrix() -> torch.Tensor:
        columns, rows, values = [], [], []
        for matrix in task_vectors:
            u, s, vh = _svd(matrix)
            keep = min(budget, _rank(s, shape))
            columns.append(u[:, :keep])
            rows.append(vh[:keep])
            values.append(s[:keep])
        if not sum(len(v) for v in values):
            return torch.zeros_like(task_vectors[0], dtype=torch.float32)
        return (_polar(torch.cat(columns, 1)) * torch.cat(values)) @ _polar(torch.cat(rows, 0))

    return _per_matrix(task_vectors, scale, merge_matrix)
