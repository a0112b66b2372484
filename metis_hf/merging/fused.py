"""Fused CPU loops for the elementwise merges (numba).

The eager kernels of each method module run as a chain of torch operations over cache-sized
chunks: about ten passes over every chunk and thousands of short parallel regions, which reads
the inputs at 1-15% of the memory bandwidth and stalls whenever another process holds a core
(each region waits for its slowest thread). Here each merge is one loop over the coordinates in
one parallel region: every input is read once, nothing is materialised but the output.

The same operations as the eager kernels, in the inputs' dtype (float32 or float64); weighted
sums are added in task order, where torch sums some slices pairwise and the eager TIES and DARE
use a matrix product, so a few coordinates differ by one rounding. Other dtypes, devices and
non-contiguous inputs take the eager path (``fusable``); ``METIS_HF_FUSED=0`` turns these off."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch

try:
    import numba
except ImportError:  # a dependency, but a platform without its wheels keeps the eager path
    numba = None

_DTYPES = (torch.float32, torch.float64)


def fusable(task_vectors: Sequence[torch.Tensor]) -> bool:
    """Whether the fused loops can merge these inputs: numba present, CPU, float32/64, contiguous."""
    if numba is None or os.environ.get("METIS_HF_FUSED", "1") == "0":
        return False
    first = task_vectors[0]
    return (
        all(
            v.device.type == "cpu" and v.dtype == first.dtype and v.is_contiguous() and not v.requires_grad
            for v in task_vectors
        )
        and first.dtype in _DTYPES
    )


def _arrays(task_vectors: Sequence[torch.Tensor]) -> tuple[np.ndarray, ...]:
    return tuple(v.detach().reshape(-1).numpy() for v in task_vectors)


def _scalars(values: Sequence[float], like: np.ndarray) -> np.ndarray:
    return np.asarray(values, dtype=like.dtype)


def _run(kernel, task_vectors: Sequence[torch.Tensor], *args) -> torch.Tensor:
    """Runs ``kernel(arrays, *args, out)`` on torch's thread count and returns ``out`` as a tensor."""
    arrays = _arrays(task_vectors)
    out = np.empty_like(arrays[0])
    numba.set_num_threads(min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    kernel(arrays, *args, out)
    return torch.from_numpy(out).view(task_vectors[0].shape)


BLOCK = 2048  # coordinates per block: a block's inputs and buffers stay in the L1/L2 cache

if numba is not None:

    def _jit(function):
        try:
            return numba.njit(parallel=True, cache=True, nogil=True)(function)
        except RuntimeError:  # no writable cache directory (read-only install and home): no cache
            return numba.njit(parallel=True, nogil=True)(function)

    _inline = numba.njit(inline="always")

    # Task arithmetic and the consensus merges run coordinate by coordinate (LLVM unrolls the task
    # loop); TIES and DARE, whose selects over tasks do not vectorise that way, run over blocks of
    # coordinates with one task at a time in each inner loop.

    @_jit
    def _weighted_sum(vectors, weights, out):
        for i in numba.prange(out.shape[0]):
            total = vectors[0][i] * weights[0]
            for t in range(1, len(vectors)):
                total += vectors[t][i] * weights[t]
            out[i] = total

    @_jit
    def _consensus(vectors, weights, mask_weights, delta, k, scale, strict, out):
        for i in numba.prange(out.shape[0]):
            total = vectors[0][i] * weights[0]
            for t in range(1, len(vectors)):
                total += vectors[t][i] * weights[t]
            owners = 0
            for t in range(len(vectors)):
                own = vectors[t][i] * mask_weights[t]
                rest = abs(total - own) * delta
                owners += (abs(own) > rest) if strict else (abs(own) >= rest)
            if owners >= k:
                out[i] = total * scale
            else:
                out[i] = 0

    @_inline
    def _weighted_sum_into(rows, weights, total):
        """``total = sum_t w_t rows[t]``, added in task order."""
        first = rows[0]
        for j in range(total.shape[0]):
            total[j] = first[j] * weights[0]
        for t in range(1, len(rows)):
            row, weight = rows[t], weights[t]
            for j in range(total.shape[0]):
                total[j] += row[j] * weight

    @_jit
    def _sparse(vectors, masks, thresholds, density, weights, scale, counts, elect, out):
        """TIES (magnitude thresholds) or DARE (keep masks, survivors rescaled), then TIES's sign
        election and disjoint mean, or a weighted sum. ``counts[j]`` is j + 1 in the data's dtype
        (an integer divisor would promote float32 to float64)."""
        count = len(vectors)
        for b in numba.prange((out.shape[0] + BLOCK - 1) // BLOCK):
            lo = b * BLOCK
            merged = out[lo : lo + BLOCK]
            size = merged.shape[0]
            values = np.empty((count, size), out.dtype)
            for t in range(count):
                vector, row = vectors[t], values[t]
                if len(masks[t]) > 0:
                    keep = masks[t]
                    for j in range(size):
                        row[j] = vector[lo + j] * keep[lo + j] / density
                else:
                    threshold = thresholds[t]
                    for j in range(size):
                        x = vector[lo + j]
                        # A zero as x - x: a float literal would promote float32 to float64.
                        row[j] = x if abs(x) >= threshold else x - x
            if not elect:
                _weighted_sum_into(values, weights, merged)
                for j in range(size):
                    merged[j] *= scale
                continue
            elected = np.empty(size, out.dtype)
            _weighted_sum_into(values, counts - counts + 1, elected)  # the unweighted sum
            agreeing = np.zeros(size, np.int32)
            for j in range(size):
                merged[j] = 0
            for t in range(count):
                row, weight = values[t], weights[t]
                for j in range(size):
                    x = row[j]
                    agrees = (x > 0) if elected[j] >= 0 else (x < 0)
                    merged[j] += (x if agrees else x - x) * weight
                    agreeing[j] += agrees
            for j in range(size):
                merged[j] = merged[j] / counts[max(agreeing[j], 1) - 1] * scale

    @_jit
    def _bracket(flat, low, high, blocks):
        """How many magnitudes lie below ``low``, and those in ``[low, high]``: counted per block
        in parallel, then gathered in parallel, each block into its own region. Both loops are
        branch-free (the gather writes every magnitude and advances only past those inside, so
        each region has one spare slot); the regions are then packed."""
        size = (flat.shape[0] + blocks - 1) // blocks
        below = np.zeros(blocks, np.int64)
        inside = np.zeros(blocks, np.int64)
        for b in numba.prange(blocks):
            under, up_to_high = 0, 0
            for i in range(b * size, min(flat.shape[0], (b + 1) * size)):
                magnitude = abs(flat[i])
                under += magnitude < low
                up_to_high += magnitude <= high
            below[b], inside[b] = under, up_to_high - under
        regions = np.cumsum(inside + 1) - (inside + 1)
        spread = np.empty(inside.sum() + blocks, flat.dtype)
        for b in numba.prange(blocks):
            j = regions[b]
            for i in range(b * size, min(flat.shape[0], (b + 1) * size)):
                magnitude = abs(flat[i])
                spread[j] = magnitude
                j += (magnitude >= low) & (magnitude <= high)
        packed = np.cumsum(inside) - inside
        candidates = np.empty(inside.sum(), flat.dtype)
        for b in numba.prange(blocks):
            candidates[packed[b] : packed[b] + inside[b]] = spread[regions[b] : regions[b] + inside[b]]
        return below.sum(), candidates


def magnitude_bracket(vector: torch.Tensor, low: float, high: float) -> tuple[int, torch.Tensor]:
    """``(#{|v| < low}, the magnitudes in [low, high])`` in two fused passes."""
    flat = vector.detach().reshape(-1).numpy()
    bounds = _scalars([low, high], flat)
    numba.set_num_threads(min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    below, candidates = _bracket(flat, bounds[0], bounds[1], 64 * numba.get_num_threads())
    return int(below), torch.from_numpy(candidates)


def weighted_sum(task_vectors: Sequence[torch.Tensor], coefficients: Sequence[float]) -> torch.Tensor:
    """``sum_t c_t * v_t``, accumulated in task order."""
    like = task_vectors[0].numpy()
    return _run(_weighted_sum, task_vectors, _scalars(coefficients, like))


def consensus(
    task_vectors: Sequence[torch.Tensor],
    weights: Sequence[float],
    delta: float,
    k: int,
    scale: float,
    strict: bool,
    weighted_mask: bool = True,
) -> torch.Tensor:
    """``scale * V`` where at least ``k`` tasks own a coordinate of ``V = sum_t w_t v_t``: task t
    owns it when ``|x_t| (>|>=) delta |V - x_t|``, with ``x_t = w_t v_t`` (ConsensusTA, METIS) or
    ``x_t = v_t`` (``weighted_mask=False``: metis_robust)."""
    like = task_vectors[0].numpy()
    delta_, scale_ = _scalars([delta, scale], like)
    mask_weights = weights if weighted_mask else [1.0] * len(task_vectors)
    args = (_scalars(weights, like), _scalars(mask_weights, like), delta_, k, scale_, strict)
    return _run(_consensus, task_vectors, *args)


def ties(
    task_vectors: Sequence[torch.Tensor], thresholds: Sequence[float], weights: Sequence[float], scale: float
) -> torch.Tensor:
    """TIES with given magnitude thresholds: trim, elect, disjoint mean, times scale."""
    no_masks = tuple(np.empty(0, dtype=np.bool_) for _ in task_vectors)
    return _sparse_merge(task_vectors, no_masks, thresholds, 1.0, weights, scale, elect=True)


def dare(
    task_vectors: Sequence[torch.Tensor],
    masks: Sequence[torch.Tensor],
    density: float,
    weights: Sequence[float],
    scale: float,
    elect: bool,
) -> torch.Tensor:
    """DARE with given keep masks: drop and rescale, then a weighted sum or TIES's election."""
    mask_arrays = tuple(m.reshape(-1).numpy() for m in masks)
    return _sparse_merge(task_vectors, mask_arrays, [0.0] * len(task_vectors), density, weights, scale, elect)


def _sparse_merge(task_vectors, masks, thresholds, density, weights, scale, elect) -> torch.Tensor:
    like = task_vectors[0].numpy()
    density_, scale_ = _scalars([density, scale], like)
    counts = np.arange(1, len(task_vectors) + 1, dtype=like.dtype)
    args = (masks, _scalars(thresholds, like), density_, _scalars(weights, like), scale_, counts, elect)
    return _run(_sparse, task_vectors, *args)
