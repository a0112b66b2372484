"""A round's merge: its parameters (from MetisConfig and the method's registry entry) and its record.

``merge_parameters`` is the one place that turns a config, a round index and measured loss gaps
into a merge call's keyword arguments; the trainer, ``metis-hf compare`` and the config's own
checks use it. ``RoundRecord`` is what a round leaves behind: written as flat ``merge/...`` keys
(for trackers, ``rounds.jsonl``, checkpoints and results files) and read back from them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from metis_hf.logs import warn_once
from metis_hf.merging import get_merge_method, merge
from metis_hf.merging.scale_search import searched_scale

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


def is_per_round(method_name: str, parameter: str, value: Any) -> bool:
    """Whether ``value`` lists one value per round: a list given for a parameter that takes one
    value (per-task parameters take lists of their own)."""
    return isinstance(value, (list, tuple)) and parameter not in get_merge_method(method_name).per_task


def merge_parameters(
    args,
    method: str,
    task_names: Sequence[str],
    round_index: int,
    gaps: Mapping[str, float] | None,
    reference_losses: Mapping[str, float] | None = None,
    example_counts: Mapping[str, int] | None = None,
    base_losses: Mapping[str, float] | None = None,
) -> tuple[dict[str, Any], list[float]]:
    """The keyword arguments of ``method``'s merge in round ``round_index`` under MetisConfig
    ``args``, and the per-task weights that merge applies (logged as alpha).

    ``args.merge_params`` (when ``method`` is ``args.merge_method``) come first, a list for a
    one-value parameter giving one value per round; then what the method's registry entry asks for:
    1/T for methods that sum tasks, a per-round seed for seeded ones, the loss gaps (and the
    merged model's and the base model's losses) for those that use them, each task's training
    examples for those that weight by them. The method's own defaults fill the rest, except that a
    default consensus count ``k`` above T is capped at T.
    """
    spec = get_merge_method(method)
    count = len(task_names)
    given = dict(args.merge_params) if method == args.merge_method else {}
    params = {
        name: value[round_index if len(value) > 1 else 0] if is_per_round(method, name, value) else value
        for name, value in given.items()
    }
    if "k" in spec.defaults and "k" not in params:
        params["k"] = min(spec.defaults["k"], count)
    if spec.sums_tasks and "scale" in spec.parameters:
        params.setdefault("scale", 1.0 / count)
    if spec.seeded and "seed" not in params:
        params["seed"] = args.seed * 1000 + round_index
    if spec.uses_example_counts and example_counts is not None and "example_counts" not in params:
        params["example_counts"] = [example_counts[t] for t in task_names]
    if spec.uses_loss_gaps:
        if gaps is None:
            raise ValueError(f"{method} needs loss gaps: pass eval_dataset (a validation split per task).")
        params["loss_gaps"] = [gaps[t] for t in task_names]
        if spec.uses_reference_losses and reference_losses is not None:
            params["reference_losses"] = [reference_losses[t] for t in task_names]
        if spec.uses_base_losses and base_losses is not None:
            params["base_losses"] = [base_losses[t] for t in task_names]
    searched = searched_scale(params)  # the weights at scale 1, until the round's search chooses
    return params, spec.weights_of({**params, searched: 1.0} if searched else params, count)


def check_merge_settings(args, task_names: Sequence[str]) -> None:
    """Every round's merge parameters, checked by the method itself on probe vectors (zero gaps,
    unit losses), so a bad value fails when the config or trainer is built, not after a round."""
    method = get_merge_method(args.merge_method)
    gaps = dict.fromkeys(task_names, 0.0)
    losses = dict.fromkeys(task_names, 1.0)
    base_losses = dict.fromkeys(task_names, 2.0)
    counts = dict.fromkeys(task_names, 1)
    rounds = args.num_rounds if args.protocol == "many_shot" else 1
    for round_index in range(rounds):
        try:
            params, _ = merge_parameters(
                args, args.merge_method, task_names, round_index, gaps, losses, counts, base_losses
            )
            searched = searched_scale(params)
            if searched:
                if not args.merge_round_updates:
                    raise ValueError(
                        f"{searched}: auto scales each round's merged update: set merge_round_updates "
                        "(a merge of whole adapters at another scale rescales the merged adapter itself)"
                    )
                params[searched] = 1.0  # checked as a number; the search chooses every round
            method.check(len(task_names), **params)
        except ValueError as err:
            where = f"round {round_index + 1}, " if rounds > 1 else ""
            raise ValueError(
                f"{args.merge_method} merge of {len(task_names)} tasks ({where}merge_params "
                f"{json.dumps(args.merge_params)}): {err}"
            ) from err
        if round_index == 0 and args.merge_space == "lora":
            _warn_if_shared_entries_vanish(args.merge_method, len(task_names), params)


def _warn_if_shared_entries_vanish(method: str, count: int, params: dict[str, Any]) -> None:
    """Consensus masks drop an entry every task shares once T is large (ConsensusTA and METIS at
    delta 0.3: from T = 5), and merged apart, the LoRA A factors share their start G_0: such a
    merge stays near the base model. Probed on identical task vectors, so any method is checked."""
    probe = torch.randn(8, 8, generator=torch.Generator().manual_seed(0))
    if merge(method, [probe] * count, **params).any():
        return
    # a recipe is checked, then its trainer: said once
    warn_once(
        __name__,
        f"{method} with {count} tasks and these settings zeroes every entry that all tasks share (a "
        f"merge of {count} identical task vectors is zero). Merged in the LoRA space, the A factors "
        "share their initialization, so the merged adapter will stay near the base model. Use "
        "metis_robust or task_arithmetic, or set delta below 1 / (T - 1); see docs/merging.md.",
    )
