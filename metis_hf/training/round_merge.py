"""A many-shot round's end: loss gaps, the merge, and the round's record.

``RoundMerger`` holds what a run carries from round to round: the merged adapter's last validation
losses (the next round's gaps start from them), the base model's losses (measured once, for merges
that read them), the round records and, when round updates are folded into the base weights, each
round's folded update. A checkpoint saves this state and a resume restores it.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file

from metis_hf.files import write_text_atomic
from metis_hf.merging import get_merge_method
from metis_hf.merging.scale_search import search_scale, searched_scale
from metis_hf.merging.task_vectors import load_lora_state, lora_parameters, lora_scaling, merge_lora_states
from metis_hf.round_record import RoundRecord
from metis_hf.training import fold
from metis_hf.training.loss import per_example_losses_on
from metis_hf.training.rounds import merge_parameters

if TYPE_CHECKING:
    from metis_hf.training.trainer import MetisTrainer

logger = logging.getLogger(__name__)

MERGED = "default"  # PEFT's default adapter name: the merged adapter G is what gets saved and loaded
ROUNDS_FILE = "rounds.jsonl"


class RoundMerger:
    """Merges a trainer's task adapters at each round's end and keeps the run's merge state."""

    def __init__(self, trainer: MetisTrainer, initial_lora: dict[str, torch.Tensor]) -> None:
        self.trainer = trainer
        self.args = trainer.args
        self.task_names = trainer.task_names
        self.merged_val_losses: dict[str, float] | None = None
        self.merged_gap_losses: dict[str, float] | None = None  # under gap_tokens='completion'
        self.base_gap_losses: dict[str, float] | None = None  # for merges that read base_losses
        self.records: list[dict[str, Any]] = []
        self.round_start_losses: dict[str, float] = {}
        self.round_local_losses: dict[str, float] = {}
        # merge_round_updates in the core space: the adapters' start, to which each merge resets them,
        # and every round's merged update, folded into the base weights
        self.initial_lora = initial_lora
        self.folded: list[fold.Factors] = []

    @property
    def folds(self) -> bool:
        """Round updates merged in the core space and folded into the base weights."""
        return self.args.merge_round_updates and self.args.merge_space != "lora"

    @property
    def separate_gap_tokens(self) -> bool:
        """The gaps use other tokens than training (completion tokens under all-token training)."""
        return self.args.gap_tokens == "completion" and not self.args.completion_only_loss

    # --- one round ----------------------------------------------------------------------------

    @torch.no_grad()
    def end_round(self, round_index: int) -> None:
        """After a round's last step: measure the loss gaps, merge, record the round."""
        trainer = self.trainer
        previous_adapter = trainer.peft_model.active_adapter
        exchanged = None
        if trainer.task_parallel:  # one process alone holds every adapter already
            exchanged = self.exchange_task_adapters() if self.args.world_size > 1 else 0
        gaps = self.measure_gaps() if trainer.validation else None
        params, alphas = merge_parameters(
            self.args,
            self.args.merge_method,
            self.task_names,
            round_index,
            gaps and gaps["gaps"],
            gaps and gaps["before"],
            {t: len(trainer.train_parts[t]) for t in self.task_names},
            gaps and gaps["base"],
        )
        searched = searched_scale(params)
        if gaps is not None:  # where a round's gain starts and ends, per task: a 'worst_task' search reads it
            self.round_start_losses, self.round_local_losses = dict(self.merged_val_losses), gaps["local"]
        merged, truncation = self.merge(params, last_round=round_index == trainer.plan.rounds - 1)
        if searched:  # merge put the chosen scale in params
            alphas = get_merge_method(self.args.merge_method).weights_of(params, len(self.task_names))
        total = sum(v.numel() for v in merged.values())
        record = RoundRecord(
            round=round_index + 1,
            mask_density=sum(int(torch.count_nonzero(v)) for v in merged.values()) / total,
            alphas=dict(zip(self.task_names, alphas)),
            truncation_error=truncation,
            exchanged_bytes=exchanged,
            scale=params[searched] if searched else None,
        )
        if gaps is not None:
            self.merged_val_losses, self.merged_gap_losses = self.val_losses(MERGED)
            record.loss_gaps, record.val_loss_local = gaps["gaps"], gaps["local"]
            record.val_loss_merged = self.merged_val_losses
            record.base_loss = gaps["base"]
            record.multitask_loss = sum(self.merged_val_losses.values()) / len(self.task_names)
            if self.separate_gap_tokens:
                record.completion_loss_merged = self.merged_gap_losses
                record.completion_loss_local = gaps["local_gap"]
        trainer.activate(previous_adapter)
        if self.args.reset_optimizer_each_round and trainer.optimizer is not None:
            inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
            inner.state.clear()
        self.record(record)

    def measure_gaps(self) -> dict[str, dict[str, float]]:
        """Each task's loss gap: the merged adapter's validation loss (``before``) minus the task
        adapter's (``local``; ``local_gap`` on the gap's tokens); and for methods that use them,
        the base model's losses on the gap's tokens (``base``, measured once per run)."""
        # Round 1: G_0, the shared initial adapter (or a checkpoint saved without gap losses).
        separate = self.separate_gap_tokens
        if self.merged_val_losses is None or (separate and self.merged_gap_losses is None):
            self.merged_val_losses, self.merged_gap_losses = self.val_losses(MERGED)
        local, local_gap = self.val_losses(None)
        before, after = (self.merged_gap_losses, local_gap) if separate else (self.merged_val_losses, local)
        method = get_merge_method(self.args.merge_method)
        if self.base_gap_losses is None and method.needs_base_losses(self.args.merge_params):
            self.trainer.activate(MERGED)
            with self.trainer.peft_model.disable_adapter():  # the base model, once per run
                base, base_gap = self.val_losses(MERGED)
            self.base_gap_losses = base_gap if separate else base
        return {
            "gaps": {t: before[t] - after[t] for t in self.task_names},
            "before": before,
            "base": self.base_gap_losses,
            "local": local,
            "local_gap": local_gap,
        }

    def merge(self, params: dict[str, Any], last_round: bool) -> tuple[dict[str, torch.Tensor], float | None]:
        """Merge the task adapters into G and write G into every adapter. After the last round
        the task adapters keep their local results: for post-hoc runs these are the experts.

        With ``merge_round_updates`` the round's updates are merged (each task adapter minus G) and
        added to G; ``scale: auto`` then chooses the update's scale on the validation loss, and
        ``params["scale"]`` is set to the scale chosen."""
        peft_model = self.trainer.peft_model
        states = [{k: p.detach() for k, p in lora_parameters(peft_model, t).items()} for t in self.task_names]
        config = peft_model.peft_config[MERGED]
        if self.folds:
            return self.merge_and_fold(states, params, last_round), 0.0
        start = None
        if self.args.merge_round_updates:
            start = {k: p.detach().clone() for k, p in lora_parameters(peft_model, MERGED).items()}
            states = [{k: state[k] - start[k] for k in state} for state in states]
        searched = searched_scale(params)
        merged, truncation = merge_lora_states(
            self.args.merge_method,
            states,
            space=self.args.merge_space,
            rank=config.r,
            scaling=lora_scaling(config.r, config.lora_alpha, config.use_rslora),
            names=self.task_names,
            **{**params, searched: 1.0} if searched else params,
        )
        if start is not None:
            update = merged  # every method's scale multiplies its result: one merge serves every candidate
            if searched:
                params[searched], _ = search_scale(lambda scale: self.search_loss_at(start, update, scale))
            factor = params[searched] if searched else 1.0
            merged = {k: start[k] + factor * update[k] for k in start}
        for adapter in (MERGED,) if last_round else (MERGED, *self.task_names):
            load_lora_state(peft_model, merged, adapter)
        return merged, truncation

    def merge_and_fold(
        self, states: list[dict[str, torch.Tensor]], params: dict[str, Any], last_round: bool
    ) -> dict[str, torch.Tensor]:
        """The round's merged update, exact in the core space, added to the base weights (at the
        scale searched on validation loss under ``auto``); every adapter then starts from zero
        again, the task adapters after the last round excepted (they keep their local results)."""
        peft_model = self.trainer.peft_model
        config = peft_model.peft_config[MERGED]
        searched = searched_scale(params)
        factors = fold.merged_round_update(
            self.args.merge_method,
            states,
            scaling=lora_scaling(config.r, config.lora_alpha, config.use_rslora),
            names=self.task_names,
            **{**params, searched: 1.0} if searched else params,
        )
        for adapter in (MERGED,) if last_round else (MERGED, *self.task_names):
            load_lora_state(peft_model, self.initial_lora, adapter)  # B = 0: the base alone
        factor = 1.0
        if searched:
            applied = 0.0

            def loss_at(scale: float) -> float:
                nonlocal applied
                fold.fold(peft_model, factors, scale - applied)
                applied = scale
                return self.search_loss()

            params[searched], _ = search_scale(loss_at)
            factor = params[searched]
            fold.fold(peft_model, factors, factor - applied)
        else:
            fold.fold(peft_model, factors, factor)
        self.folded.append({prefix: (factor * b, a) for prefix, (b, a) in factors.items()})
        return {
            f"{prefix}.lora_{side}.weight": t
            for prefix, pair in factors.items()
            for side, t in zip("BA", pair)
        }

    def search_loss_at(
        self, start: dict[str, torch.Tensor], update: dict[str, torch.Tensor], scale: float
    ) -> float:
        """``search_loss`` of G = ``start + scale * update``, written into G."""
        load_lora_state(self.trainer.peft_model, {k: start[k] + scale * update[k] for k in start}, MERGED)
        return self.search_loss()

    def search_loss(self) -> float:
        """What a scale search minimises (``scale_objective``), for the merged adapter as it is now."""
        losses, _ = self.val_losses(MERGED)
        if self.args.scale_objective == "worst_task":
            return worst_share_lost(losses, self.round_start_losses, self.round_local_losses)
        return sum(losses.values()) / len(losses)

    def val_losses(self, adapter: str | None) -> tuple[dict[str, float], dict[str, float] | None]:
        """Mean validation loss per task of ``adapter`` (None: each task's own adapter) on the
        trained tokens and, when the gaps use the completion tokens instead, on those too (the same
        forward gives both)."""
        trainer = self.trainer
        token_sets = ["completion" if self.args.completion_only_loss else "all"]
        if self.separate_gap_tokens:
            token_sets.append("completion")
        trained: dict[str, float] = {}
        completion: dict[str, float] = {}
        for task in self.owned_tasks():
            trainer.activate(adapter or task)
            losses = per_example_losses_on(
                trainer.peft_model,
                trainer.validation[task],
                token_sets,
                self.args.gap_batch_size,
                fused=True,  # SFTTrainer patched the model: the training loss's own kernel, no full logits
            )
            trained[task] = float(losses[0].mean())
            if len(losses) > 1:
                completion[task] = float(losses[1].mean())
        if trainer.task_parallel and self.args.world_size > 1:  # each process measured its own tasks
            gathered: list[Any] = [None] * self.args.world_size
            torch.distributed.all_gather_object(gathered, (trained, completion))
            trained = {t: v for part, _ in gathered for t, v in part.items()}
            completion = {t: v for _, part in gathered for t, v in part.items()}
            trained = {t: trained[t] for t in self.task_names}  # the tasks' order, not the owners'
            completion = {t: completion[t] for t in self.task_names if t in completion}
        return trained, (completion if len(token_sets) > 1 else None)

    def owned_tasks(self) -> list[str]:
        """The tasks this process trains and measures (all of them but in task_parallel)."""
        if not self.trainer.task_parallel:
            return self.task_names
        return [self.task_names[t] for t in self.trainer.plan.process_tasks[self.args.process_index]]

    def exchange_task_adapters(self) -> int:
        """task_parallel, at a round's end: every task adapter goes from the process that trained
        it to all the others (one broadcast of its flattened factors); returns the bytes sent."""
        sent = 0
        for index, task in enumerate(self.task_names):
            params = list(lora_parameters(self.trainer.peft_model, task).values())
            flat = torch.cat([p.detach().reshape(-1) for p in params])
            torch.distributed.broadcast(flat, src=self.trainer.plan.owner(index))
            sent += flat.numel() * flat.element_size()
            offset = 0
            for p in params:
                p.copy_(flat[offset : offset + p.numel()].view_as(p))
                offset += p.numel()
        return sent

    # --- the record ---------------------------------------------------------------------------

    def record(self, record: RoundRecord) -> None:
        """Keep the round (checkpoints and results read the records), log it to the trackers and
        append it to ``rounds.jsonl``."""
        trainer = self.trainer
        row = record.to_log()
        self.records.append(row)
        trainer.log(dict(row))
        if trainer.is_world_process_zero():
            os.makedirs(self.args.output_dir, exist_ok=True)
            with open(os.path.join(self.args.output_dir, ROUNDS_FILE), "a") as handle:
                handle.write(json.dumps({"step": trainer.state.global_step, **row}) + "\n")

    def reset_rounds_file(self, keep: int) -> None:
        """``rounds.jsonl`` holds this run's rounds only: a fresh run starts it anew, a resumed run
        keeps the rounds its checkpoint had finished (later lines would be logged again)."""
        path = os.path.join(self.args.output_dir, ROUNDS_FILE)
        if not self.trainer.is_world_process_zero() or not os.path.exists(path):
            return
        lines = open(path).read().splitlines(keepends=True)[:keep]
        if not keep:
            logger.warning("%s: replacing the rounds of an earlier run in this output_dir.", path)
        write_text_atomic(path, "".join(lines))

    # --- checkpoints and the saved adapter ----------------------------------------------------

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps of the merge state (the folded rounds go to their own file)."""
        return {
            "merged_val_losses": self.merged_val_losses,
            "merged_gap_losses": self.merged_gap_losses,
            "base_gap_losses": self.base_gap_losses,
            "round_records": self.records,
        }

    def restore(self, state: dict[str, Any], checkpoint_dir: str) -> None:
        """A resumed run's merge state, and its base weights: the fresh base plus the checkpoint's
        folded rounds."""
        if self.folds:
            if self.folded:
                raise RuntimeError(
                    "this trainer already folded rounds into its base model: build a new one to resume"
                )
            folded = os.path.join(checkpoint_dir, fold.FOLDED_FILE)
            self.folded = fold.from_tensors(load_file(folded)) if os.path.isfile(folded) else []
            for factors in self.folded:
                fold.fold(self.trainer.peft_model, factors, 1.0)
        self.merged_val_losses = state["merged_val_losses"]
        self.merged_gap_losses = state.get("merged_gap_losses")
        self.base_gap_losses = state.get("base_gap_losses")
        self.records = state["round_records"]

    def save_folded(self, checkpoint_dir: str) -> None:
        """The base weights are not in a checkpoint: the updates folded into them are."""
        if self.folded:
            save_file(fold.to_tensors(self.folded), os.path.join(checkpoint_dir, fold.FOLDED_FILE))

    def save_folded_adapter(self, output_dir: str) -> None:
        """The rounds' folded updates as one LoRA adapter on the original base model: their factors
        stacked (rank: the rounds' ranks summed; scaling 1)."""
        state, rank = fold.stacked_adapter(self.folded)
        config = copy.deepcopy(self.trainer.peft_model.peft_config[MERGED])
        config.r, config.lora_alpha, config.use_rslora = rank, rank, False
        config.save_pretrained(output_dir)
        save_file(state, os.path.join(output_dir, "adapter_model.safetensors"), metadata={"format": "pt"})


def worst_share_lost(merged: dict[str, float], start: dict[str, float], local: dict[str, float]) -> float:
    """The largest share of its round's gain a task loses in the merge: ``(merged - local) /
    (start - local)`` per task, over the tasks whose own adapter lowered its loss this round (0:
    the merge keeps the task's whole gain, 1: none of it). The mean merged loss when no task's
    adapter improved, so that the search still has something to minimise."""
    gained = [t for t in merged if start[t] - local[t] > 0]
    if not gained:
        return sum(merged.values()) / len(merged)
    return max((merged[t] - local[t]) / (start[t] - local[t]) for t in gained)
