"""Chunked evaluation of elementwise merge kernels.

Every method here is elementwise once its per-task statistics are known (TIES's magnitude
threshold, DARE's drop masks), so it runs over slices of the flattened task vectors: memory
beyond the inputs is the output plus a few cache-sized slices, never a T-fold stack. This is the
path for GPUs and half precision; float32/64 on CPU takes the fused loops of ``fused.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

CHUNK_ELEMENTS = 1 << 18  # 1 MiB of float32 per task vector: stays in cache on common CPUs

# A kernel maps a [T, c] float32 slice of the stacked task vectors, and the slice's position in
# the flattened vectors, to the [c] merged slice.
Kernel = Callable[[torch.Tensor, slice], torch.Tensor]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half-precision inputs are merged in float32, then cast back."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def chunked_merge(
    task_vectors: Sequence[torch.Tensor], kernel: Kernel, chunk: int = CHUNK_ELEMENTS
) -> torch.Tensor:
    flat = [v.reshape(-1) for v in task_vectors]
    first = task_vectors[0]
    work = compute_dtype(first.dtype)
    out = torch.empty(first.numel(), dtype=first.dtype, device=first.device)
    for start in range(0, out.numel(), chunk):
        where = slice(start, min(start + chunk, out.numel()))
        stacked = torch.stack([f[where] for f in flat]).to(work)
        out[where] = kernel(stacked, where)
    return out.view(first.shape)


def as_column(values: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    """Per-task scalars as a [T, 1] tensor that broadcasts over a [T, c] slice."""
    return torch.tensor(values, dtype=compute_dtype(like.dtype), device=like.device).unsqueeze(1)
