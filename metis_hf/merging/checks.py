"""Input and parameter validation shared by every merge method. Errors name the culprit."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch


def check_task_vectors(
    task_vectors: Sequence[torch.Tensor], name: str | None = None, check_finite: bool = True
) -> list[torch.Tensor]:
    where = f" for tensor {name!r}" if name else ""
    vectors = list(task_vectors)
    if not vectors:
        raise ValueError(f"No task vectors to merge{where}.")
    first = vectors[0]
    for i, v in enumerate(vectors):
        if not isinstance(v, torch.Tensor):
            raise ValueError(f"Task vector {i}{where} is a {type(v).__name__}, not a torch.Tensor.")
        if v.shape != first.shape:
            raise ValueError(
                f"Task vector {i}{where} has shape {tuple(v.shape)}, task 0 has {tuple(first.shape)}."
            )
        if not v.is_floating_point():
            raise ValueError(f"Task vector {i}{where} has dtype {v.dtype}; merging needs floating point.")
        if v.dtype != first.dtype:
            raise ValueError(
                f"Task vector {i}{where} has dtype {v.dtype}, task 0 has {first.dtype}; cast them to one dtype."
            )
        if v.device != first.device:
            raise ValueError(f"Task vector {i}{where} is on {v.device}, task 0 on {first.device}.")
        if check_finite and not all_finite(v):
            raise ValueError(f"Task vector {i}{where} has NaN or Inf entries.")
    return vectors


def all_finite(tensor: torch.Tensor) -> bool:
    """Exact and fast: a finite sum means every entry is finite (NaN and Inf propagate through a
    sum); only a non-finite sum, a bad entry or an overflow, needs the elementwise check."""
    if bool(
        torch.isfinite(tensor.sum(dtype=torch.float64 if tensor.dtype == torch.float64 else torch.float32))
    ):
        return True
    return bool(torch.isfinite(tensor).all())


def check_weights(
    weights: Sequence[float] | torch.Tensor | None, count: int, name: str = "weights"
) -> list[float]:
    if weights is None:
        return [1.0] * count
    if isinstance(weights, torch.Tensor):
        weights = weights.tolist()
    if isinstance(weights, Mapping) or not isinstance(weights, Sequence) or isinstance(weights, str):
        raise ValueError(
            f"{name} must be a list of {count} numbers in task order, got {type(weights).__name__} ({weights!r})."
        )
    try:
        values = [float(w) for w in weights]
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a list of {count} numbers, got {weights!r}.") from None
    if len(values) != count:
        raise ValueError(f"{name} has {len(values)} entries for {count} task vectors.")
    if not all(math.isfinite(w) for w in values):
        raise ValueError(f"{name} must be finite, got {values}.")
    return values


def check_convex_weights(weights: Sequence[float], name: str = "alphas") -> list[float]:
    """Weights of a convex combination: none negative, summing to 1 (the merge keeps one adapter's
    scale only then)."""
    if any(w < 0 for w in weights) or not math.isclose(sum(weights), 1.0, abs_tol=1e-4):
        raise ValueError(f"{name} must be >= 0 and sum to 1 (a convex combination), got {list(weights)}.")
    return list(weights)


def check_seed(seed, count: int):
    """None, an integer, or one integer per task vector."""
    if seed is None or (isinstance(seed, int) and not isinstance(seed, bool)):
        return seed
    if isinstance(seed, Sequence) and not isinstance(seed, str):
        if all(isinstance(s, int) and not isinstance(s, bool) for s in seed):
            if len(seed) != count:
                raise ValueError(f"seed has {len(seed)} entries for {count} task vectors.")
            return list(seed)
    raise ValueError(f"seed must be an integer or a list of {count} integers, got {seed!r}.")


def check_density(density: float) -> float:
    if not (0.0 < float(density) <= 1.0):
        raise ValueError(f"density must be in (0, 1], got {density}.")
    return float(density)


def check_delta(delta: float) -> float:
    if not (float(delta) >= 0.0 and math.isfinite(float(delta))):
        raise ValueError(f"delta must be a finite number >= 0, got {delta}.")
    return float(delta)


def check_k(k: int, count: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or not (1 <= k <= count):
        raise ValueError(f"k must be an integer in [1, {count}] (the number of task vectors), got {k!r}.")
    return k


def check_positive(value: float, name: str) -> float:
    if not (math.isfinite(float(value)) and float(value) > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value}.")
    return float(value)


def check_finite_number(value: float, name: str) -> float:
    if not math.isfinite(float(value)):
        raise ValueError(f"{name} must be finite, got {value}.")
    return float(value)
