"""What a many-shot round leaves behind: ``RoundRecord``, plain data.

Written as flat ``merge/...`` keys (for trackers, ``rounds.jsonl``, checkpoints and results files)
and read back from them. Training writes records; reports and model cards read them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# Per-task fields of a round record and their log-key prefixes, in the order they are logged.
TASK_FIELDS = {
    "loss_gaps": "merge/loss_gap",
    "val_loss_merged": "merge/val_loss_merged",
    "val_loss_local": "merge/val_loss_local",
    "completion_loss_merged": "merge/completion_loss_merged",
    "completion_loss_local": "merge/completion_loss_local",
    "base_loss": "merge/base_loss",
}
ALPHA_KEY, DENSITY_KEY = "merge/alpha", "merge/mask_density"
MULTITASK_KEY, TRUNCATION_KEY = "merge/multitask_loss", "merge/truncation_error"
SCALE_KEY = "merge/scale"
EXCHANGED_KEY = "merge/exchanged_bytes"


@dataclass
class RoundRecord:
    """One round's merge: per-task weights, the share of coordinates kept, and (with validation
    data) each task's loss gap and the merged and local validation losses."""

    round: int
    mask_density: float
    alphas: dict[str, float]
    loss_gaps: dict[str, float] | None = None
    val_loss_merged: dict[str, float] | None = None
    val_loss_local: dict[str, float] | None = None
    # Only when the gaps use the completion tokens under all-token training (gap_tokens='completion').
    completion_loss_merged: dict[str, float] | None = None
    completion_loss_local: dict[str, float] | None = None
    base_loss: dict[str, float] | None = None  # the base model's, on the gap tokens: when the merge reads it
    multitask_loss: float | None = None  # the merged adapter's mean validation loss over tasks
    truncation_error: float | None = None  # dense space: the share of the merge rank r dropped
    exchanged_bytes: int | None = None  # task_parallel: the adapter bytes broadcast before the merge
    scale: float | None = None  # scale: auto: the scale the round's search chose

    @property
    def tasks(self) -> list[str]:
        return list(self.alphas)

    def to_log(self) -> dict[str, Any]:
        """Flat ``merge/...`` keys, one per task and quantity (what ``Trainer.log`` takes)."""
        row: dict[str, Any] = {"round": self.round, DENSITY_KEY: self.mask_density}
        row.update({f"{ALPHA_KEY}/{t}": a for t, a in self.alphas.items()})
        present = {name: getattr(self, name) for name in TASK_FIELDS if getattr(self, name) is not None}
        for task in self.tasks:
            row.update({f"{TASK_FIELDS[name]}/{task}": values[task] for name, values in present.items()})
        if self.multitask_loss is not None:
            row[MULTITASK_KEY] = self.multitask_loss
        if self.truncation_error is not None:
            row[TRUNCATION_KEY] = self.truncation_error
        if self.exchanged_bytes is not None:
            row[EXCHANGED_KEY] = self.exchanged_bytes
        if self.scale is not None:
            row[SCALE_KEY] = self.scale
        return row

    @classmethod
    def from_log(cls, row: Mapping[str, Any]) -> RoundRecord:
        """A record from its flat keys (``rounds.jsonl`` lines, ``results.json`` rounds)."""

        def per_task(prefix: str) -> dict[str, float] | None:
            values = {k.removeprefix(prefix + "/"): v for k, v in row.items() if k.startswith(prefix + "/")}
            return values or None

        return cls(
            round=row["round"],
            mask_density=row[DENSITY_KEY],
            alphas=per_task(ALPHA_KEY) or {},
            multitask_loss=row.get(MULTITASK_KEY),
            truncation_error=row.get(TRUNCATION_KEY),
            exchanged_bytes=row.get(EXCHANGED_KEY),
            scale=row.get(SCALE_KEY),
            **{name: per_task(prefix) for name, prefix in TASK_FIELDS.items()},
        )
