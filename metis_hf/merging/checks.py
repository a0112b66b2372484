"""Input and parameter validation shared by every merge method. Errors name the culprit."""

from __future__ import annotations

import math
from collections.abc import Sequence

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
    values = [float(w) for w in (weights.tolist() if isinstance(weights, torch.Tensor) else weights)]
    if len(values) != count:
        raise ValueError(f"{name} has {len(values)} entries for {count} task vectors.")
    if not all(math.isfinite(w) for w in values):
        raise ValueError(f"{name} must be finite, got {values}.")
    return values


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
