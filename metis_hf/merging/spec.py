"""A merge setting: a registered method and the parameters stated for it.

A parameter that takes one value may list one value per round of a many-shot run. What a stated
setting leaves open is filled here, in one place, for every caller (the trainer, ``metis-hf
compare``, ``metis-hf merge``): a consensus count ``k`` above the task count is capped at it,
methods that sum tasks scale by 1/T, seeded methods get a per-round seed, and the method's own
defaults fill the rest.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from metis_hf.merging.registry import MergeMethod, get_merge_method


@dataclass(frozen=True)
class MergeSpec:
    method: str
    params: Mapping[str, Any] = field(default_factory=dict)

    @property
    def entry(self) -> MergeMethod:
        return get_merge_method(self.method)

    @property
    def default_space(self) -> str:
        """Where LoRA adapters are merged unless stated: the core space for methods on layer
        matrices (the SVD methods), the factors themselves ('lora') for the others."""
        return "core" if self.entry.operates_on == "matrices" else "lora"

    def is_per_round(self, name: str) -> bool:
        """Whether parameter ``name`` lists one value per round: a list given for a parameter that
        takes one value (per-task parameters take lists of their own)."""
        value = self.params.get(name)
        return isinstance(value, (list, tuple)) and name not in self.entry.per_task

    def for_round(self, round_index: int, task_count: int, seed: int = 0) -> dict[str, Any]:
        """The stated parameters of round ``round_index`` (0-based; a one-value list serves every
        round), with what the method's registry entry implies for ``task_count`` tasks."""
        params = {
            name: value[round_index if len(value) > 1 else 0] if self.is_per_round(name) else value
            for name, value in self.params.items()
        }
        entry = self.entry
        if "k" in entry.defaults and "k" not in params:
            params["k"] = min(entry.defaults["k"], task_count)
        if entry.sums_tasks and "scale" in entry.parameters:
            params.setdefault("scale", 1.0 / task_count)
        if entry.seeded and "seed" not in params:
            params["seed"] = seed * 1000 + round_index
        return params

    def beyond_defaults(self, task_count: int) -> dict[str, Any]:
        """The stated parameters whose values differ from what a run fills in unstated: the part
        of the setting that changes a merge."""
        filled = {**self.entry.defaults, **MergeSpec(self.method).for_round(0, task_count)}
        filled.pop("seed", None)  # a per-run seed: a stated one always counts
        return {name: value for name, value in self.params.items() if filled.get(name) != value}
