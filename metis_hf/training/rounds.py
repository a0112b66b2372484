"""A round's merge parameters, from MetisConfig and the method's registry entry.

``merge_parameters`` is the one place that turns a config, a round index and measured loss gaps
into a merge call's keyword arguments; the trainer, ``metis-hf compare`` and the config's own
checks use it. What a round leaves behind is a ``metis_hf.round_record.RoundRecord``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from metis_hf.logs import warn_once
from metis_hf.merging import get_merge_method, merge
from metis_hf.merging.scale_search import searched_scale
from metis_hf.merging.spec import MergeSpec


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

    ``args.merge_params`` (when ``method`` is ``args.merge_method``), resolved for the round by
    ``MergeSpec.for_round``; then the data the method's registry entry asks for: the loss gaps (and
    the merged model's and the base model's losses) for those that use them, each task's training
    examples for those that weight by them.
    """
    spec = get_merge_method(method)
    count = len(task_names)
    given = dict(args.merge_params) if method == args.merge_method else {}
    params = MergeSpec(method, given).for_round(round_index, count, args.seed)
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
