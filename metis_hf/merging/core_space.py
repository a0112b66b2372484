"""LoRA adapters merged in their core space (Core Space merging, Panariello et al. 2025).

Task t's update of one module is ``Delta_t = s_t B_t A_t`` (m x n, rank <= r_t). Every Delta_t lies
in ``span(B_1..B_T) x span(A_1..A_T)``: with orthonormal bases ``L`` (m x p) and ``R`` (n x q) of the
stacked factors (QR; p, q <= sum_t r_t), ``Delta_t = L C_t R^T`` where the core ``C_t`` is p x q.
Merging the cores and mapping back equals merging the dense matrices for every method that
commutes with orthonormal changes of basis (task arithmetic, Iso-C, Iso-CTS, TSV-M), at a cost that
grows with T * r instead of m * n, and adapters of different ranks merge as easily as equal ones.
Elementwise methods (TIES, DARE, ConsensusTA, METIS) run on the core entries, as the paper does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from metis_hf.merging.checks import check_task_vectors
from metis_hf.merging.registry import get_merge_method

StateDict = dict[str, torch.Tensor]


@dataclass
class Core:
    """One module's tasks in their shared bases: ``Delta_t = left @ cores[t] @ right.T``."""

    left: torch.Tensor  # m x p, orthonormal columns spanning every task's B
    right: torch.Tensor  # n x q, orthonormal columns spanning every task's A^T
    cores: list[torch.Tensor]  # p x q per task

    @property
    def full_shape(self) -> tuple[int, int]:
        return self.left.shape[0], self.right.shape[0]


def lora_cores(
    states: Sequence[Mapping[str, torch.Tensor]],
    scalings: Sequence[float],
    pairs: Mapping[str, tuple[str, str]],
) -> dict[str, Core]:
    """Module prefix -> its :class:`Core`, from each task's LoRA factors (ranks may differ)."""
    out = {}
    for prefix, (a_key, b_key) in pairs.items():
        stacked_b = torch.cat([s * state[b_key].float() for s, state in zip(scalings, states)], 1)
        stacked_a = torch.cat([state[a_key].float() for state in states], 0)
        left, coeff_b = torch.linalg.qr(stacked_b)  # m x p, p x R
        right, coeff_a = torch.linalg.qr(stacked_a.T)  # n x q, q x R
        cores, start = [], 0
        for state in states:
            rank = state[a_key].shape[0]
            block = slice(start, start + rank)
            cores.append(coeff_b[:, block] @ coeff_a[:, block].T)
            start += rank
        out[prefix] = Core(left, right, cores)
    return out


def merge_in_core(
    method: str,
    cores: Mapping[str, Core],
    rank: int,
    scaling: float,
    dtype: torch.dtype,
    seed: int | Sequence[int] | None = None,
    **params,
) -> tuple[StateDict, float]:
    """Merge each module's cores with ``method`` and return the best rank-``rank`` LoRA factors of
    the merged update (``scaling * B @ A`` is its truncated SVD) and the share of its Frobenius norm
    that truncation dropped, over all modules."""
    from metis_hf.merging.task_vectors import key_seed

    spec = get_merge_method(method)
    out: StateDict = {}
    dropped_total = norm_total = 0.0
    for index, (prefix, core) in enumerate(cores.items()):
        check_task_vectors(core.cores, name=prefix)
        extra = {"_full_shape": core.full_shape} if "_full_shape" in spec.internal else {}
        merged = spec(core.cores, **params, **key_seed(seed, index), **extra)
        u, s, vh = torch.linalg.svd(merged.float(), full_matrices=False)
        root = torch.sqrt(s[:rank] / scaling)
        factor_a = (root[:, None] * vh[:rank]) @ core.right.T
        factor_b = core.left @ (u[:, :rank] * root[None, :])
        missing = rank - len(root)  # a core smaller than the rank: zero factors fill the adapter
        out[prefix + ".lora_A.weight"] = torch.nn.functional.pad(factor_a, (0, 0, 0, missing)).to(dtype)
        out[prefix + ".lora_B.weight"] = torch.nn.functional.pad(factor_b, (0, missing)).to(dtype)
        dropped_total += float((s[rank:] ** 2).sum())
        norm_total += float((s**2).sum())
    error = (dropped_total / norm_total) ** 0.5 if norm_total > 0 else 0.0
    return dict(sorted(out.items())), error
