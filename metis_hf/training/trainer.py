"""MetisTrainer: many-shot merging as a TRL ``SFTTrainer`` subclass.

One ``train()`` call runs every round. The model is a PeftModel holding T task adapters (named by
task) and the merged adapter G (PEFT's ``"default"``, which is what ``save_model`` writes). All
adapters start from one LoRA initialisation. The extension points used, all public:

* ``_get_train_sampler``: the round plan's example order, so every optimizer step holds one task's
  micro-batches (sequential, interleaved) or every task's, in per-task row blocks (parallel);
* ``training_step``: activates the step's task adapter (parallel: routes each row block to its
  task's adapter; task_parallel: this process's task, gradients kept local), then ``super()``;
* ``create_optimizer``: one AdamW over every task adapter. A parameter without a gradient is
  skipped by AdamW, so each task keeps its own moments and step count;
* ``create_scheduler``: linear decay to 0 within each task's round (the reference's);
* a callback: after the last step of a round, ``RoundMerger`` (round_merge.py) measures the loss
  gaps, merges, writes the merge into every adapter in place (parameter identity kept), resets the
  optimizer's moments and logs the round; on save, the round state goes into the checkpoint.

``train_to_branch_point`` stops a run before a round's merge and checkpoints it there; runs that
differ only in how they merge resume from that checkpoint (``train(resume_from_checkpoint=...)``)
and start with their own merge, as if they had trained that far themselves.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import re
from collections.abc import Mapping
from typing import Any

import torch
from datasets import Dataset, concatenate_datasets
from peft import LoraConfig, PeftModel, get_peft_model
from torch.optim.lr_scheduler import LambdaLR
from transformers import TrainerCallback, set_seed
from transformers.trainer_utils import get_last_checkpoint
from trl import SFTTrainer

from metis_hf.merging import get_merge_method
from metis_hf.merging.scale_search import AUTO
from metis_hf.merging.task_vectors import (
    load_lora_state,
    lora_parameters,
)
from metis_hf.models import load_model, load_tokenizer
from metis_hf.paper import ARXIV_ID, CITATION, TITLE
from metis_hf.tokenization import tokenize_dataset
from metis_hf.training.config import MetisConfig
from metis_hf.training.lora import check_lora_config, default_lora_config
from metis_hf.training.plan import FixedOrderSampler, RoundPlan
from metis_hf.training.round_merge import MERGED, RoundMerger
from metis_hf.training.rounds import check_merge_settings

logger = logging.getLogger(__name__)

STATE_FILE = "metis_state.json"
# MetisConfig fields a pushed adapter's card lists under "Training settings".
CARD_SETTINGS = (
    "protocol",
    "merge_method",
    "merge_params",
    "num_rounds",
    "local_steps",
    "local_epochs",
    "task_schedule",
    "merge_space",
    "learning_rate",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "max_length",
    "completion_only_loss",
    "seed",
)
# MetisConfig fields that act only at a merge (or on what is logged or saved): runs differing in
# these alone train identically up to their first merge, so they can branch from one checkpoint there.
MERGE_ONLY_SETTINGS = frozenset(
    {
        "merge_method",
        "merge_params",
        "merge_space",
        "merge_round_updates",
        "scale_objective",
        "temperature",
        "delta",
        "k",
        "beta",
        "gap_tokens",
        "gap_batch_size",
        "reset_optimizer_each_round",
        "output_dir",
        "logging_dir",
        "run_name",
        "save_task_adapters",
        "save_merged_model",
        "push_to_hub",
        "hub_model_id",
        "hub_token",
        "report_to",
        "disable_tqdm",
        "logging_steps",
        "save_strategy",
        "save_steps",
        "save_total_limit",
    }
)


class MetisTrainer(SFTTrainer):
    """Alternates SFT steps across per-task LoRA adapters and merges them every round.

    Args:
        model: a model, or a built-in name / Hub id / path (loaded in float32).
        args: a :class:`MetisConfig`. Its ``max_steps`` is set from the round plan.
        train_dataset: task name -> dataset with ``prompt`` and ``completion`` columns.
        eval_dataset: task name -> validation dataset (same columns); needed by METIS's gaps.
        processing_class: the tokenizer (loaded from ``model`` when omitted).
        peft_config: a ``LoraConfig`` (default: the reference's r=16 on q/k/v/o).
    """

    # Read by TRL's model-card code (tags and citation of cards that TRL writes).
    _tag_names = ["trl", "sft", "metis", "model-merging"]
    _name = "METIS"
    _paper = {
        "title": TITLE,
        "id": ARXIV_ID,
        "citation": CITATION,
    }

    def __init__(
        self,
        model: str | torch.nn.Module,
        args: MetisConfig,
        train_dataset: Mapping[str, Dataset],
        eval_dataset: Mapping[str, Dataset] | None = None,
        processing_class=None,
        peft_config: LoraConfig | None = None,
        callbacks: list[TrainerCallback] | None = None,
        **kwargs: Any,
    ) -> None:
        if not isinstance(args, MetisConfig):
            raise TypeError(f"args must be a MetisConfig, got {type(args).__name__}.")
        self.task_names = _check_tasks(args, train_dataset, eval_dataset)
        check_merge_settings(args, self.task_names)
        peft_config = peft_config if peft_config is not None else default_lora_config()
        if not isinstance(peft_config, LoraConfig):
            raise ValueError(f"peft_config must be a peft.LoraConfig, got {type(peft_config).__name__}.")
        check_lora_config(peft_config)
        self._parallel = args.task_schedule == "parallel"
        self.task_parallel = args.task_schedule == "task_parallel"
        if self.task_parallel:
            # Each process's loss is normalised by its own tokens: no process averages with another.
            args.average_tokens_across_devices = False
            if args.save_strategy != "no" and not args.reset_optimizer_each_round:
                raise ValueError(
                    "task_schedule='task_parallel' checkpoints only with reset_optimizer_each_round=True: "
                    "each process holds the optimizer state of its own tasks, which a checkpoint cannot gather."
                )
        self._rows_per_task = args.per_device_train_batch_size
        self._step_tokens = [0] * len(self.task_names)
        self._clip_norm = args.max_grad_norm
        if self._parallel:
            if args.per_device_train_batch_size % len(self.task_names):
                raise ValueError(
                    f"task_schedule='parallel': per_device_train_batch_size ({args.per_device_train_batch_size}) "
                    f"must be a multiple of the number of tasks ({len(self.task_names)})."
                )
            self._rows_per_task = args.per_device_train_batch_size // len(self.task_names)
            # The Trainer would clip the norm of all adapters together; each adapter is clipped on
            # its own in `_per_task_gradients`, as the other schedules' per-task steps are.
            args.max_grad_norm = 0.0
        if processing_class is None:
            name = model if isinstance(model, str) else model.config.name_or_path
            processing_class = load_tokenizer(name)
        if processing_class.pad_token is None:
            processing_class.pad_token = processing_class.eos_token
        if isinstance(model, str):
            model = load_model(model)
        if isinstance(model, PeftModel):
            raise ValueError(
                "Pass the base model and a LoraConfig; MetisTrainer builds the task adapters itself."
            )

        # The trainer drops examples that have no trained token after truncation itself, before
        # it fixes each task's row range: TRL would drop them later and shift every range after.
        self.train_parts = {
            t: scored_examples(
                processing_class, d, f"task {t!r} train", bool(args.completion_only_loss), args.max_length
            )
            for t, d in train_dataset.items()
        }
        # Sorted by length: a gap is a mean of per-example losses, so order does not matter, and
        # batches of similar lengths carry little padding.
        self.validation = {
            t: _sorted_by_length(
                scored_examples(
                    processing_class, d, f"task {t!r} validation", gaps_on_completion(args), args.max_length
                )
            )
            for t, d in (eval_dataset or {}).items()
        }
        # The shared initial adapter G_0 comes from the seed, not from whatever ran before in the
        # process (a resumed compare must rebuild the same G_0). Trainer seeds only later.
        set_seed(args.seed)
        peft_model = _build_adapters(model, peft_config, self.task_names)

        self.plan = make_round_plan(
            args, self.task_names, [len(self.train_parts[t]) for t in self.task_names], self._rows_per_task
        )
        args.max_steps = self.plan.total_steps
        combined, start = [], 0
        self.task_ranges = []
        for t in self.task_names:
            combined.append(self.train_parts[t])
            self.task_ranges.append(range(start, start + len(self.train_parts[t])))
            start += len(self.train_parts[t])
        self._branch_round: int | None = None  # train_to_branch_point: stop before this round's merge
        self._pending_merge: int | None = None  # resumed from a branch point: merge this round first
        # The adapters' common start, before SFTTrainer prepares the model.
        initial_lora = {k: p.detach().clone() for k, p in lora_parameters(peft_model, MERGED).items()}
        # Ours first: a round's merge and a checkpoint's round state precede what user callbacks see.
        callbacks = [_RoundCallback(self), *(callbacks or [])]
        super().__init__(
            model=peft_model,
            args=args,
            train_dataset=concatenate_datasets(combined),
            eval_dataset=dict(self.validation) or None,
            processing_class=processing_class,
            callbacks=callbacks,
            **kwargs,
        )
        if len(self.train_dataset) != start:  # the task ranges index this dataset row by row
            raise RuntimeError(
                f"SFTTrainer kept {len(self.train_dataset)} of the {start} training rows; MetisTrainer's "
                "task ranges would point at other tasks' rows."
            )
        self.rounds = RoundMerger(self, initial_lora)

    @property
    def round_records(self) -> list[dict[str, Any]]:
        """Every merged round so far, as flat ``merge/...`` keys (``RoundRecord.to_log``)."""
        return self.rounds.records

    # --- extension points ---------------------------------------------------------------------

    def _get_train_sampler(self, train_dataset=None):
        micro_batches = self.args.gradient_accumulation_steps * self.args.world_size
        return FixedOrderSampler(
            self.plan.example_order(self.task_ranges, self._rows_per_task, micro_batches, self.args.seed)
        )

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.task_parallel:  # this process's task; its gradients stay here (no all-reduce)
            self.activate(
                self.task_names[self.plan.step(self.state.global_step, self.args.process_index).task]
            )
            with self.accelerator.no_sync(model):
                return super().training_step(model, inputs, num_items_in_batch)
        if not self._parallel:
            self.activate(self.task_names[self.plan.step(self.state.global_step).task])
            return super().training_step(model, inputs, num_items_in_batch)
        # Parallel: rows come in per-task blocks of `_rows_per_task`; route each block to its adapter
        # (PEFT's mixed-batch forward, reached through the same kind of pre-forward hook PEFT uses
        # at inference) and count each task's loss tokens for its own normalisation.
        rows = self._rows_per_task
        labels = inputs["labels"]
        for t in range(len(self.task_names)):
            self._step_tokens[t] += int((labels[t * rows : (t + 1) * rows] != -100).sum())
        names = [task for task in self.task_names for _ in range(rows)][: labels.shape[0]]
        handles = _route_rows(self.peft_model, names)
        try:
            return super().training_step(model, inputs, num_items_in_batch)
        finally:
            for handle in handles:
                handle.remove()

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            peft_model = self.peft_model
            params = [p for t in self.task_names for p in lora_parameters(peft_model, t).values()]
            for p in params:
                p.requires_grad_(True)
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, peft_model)
            self.optimizer = optimizer_cls(
                [{"params": params, "weight_decay": self.args.weight_decay}], **optimizer_kwargs
            )
            if self._parallel:
                self.optimizer.register_step_pre_hook(self._per_task_gradients)
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.lr_scheduler is None:
            mode = self.args.round_lr_schedule
            plan = self.plan
            process = self.args.process_index
            self.lr_scheduler = LambdaLR(
                optimizer or self.optimizer, lambda step: plan.lr_factor(step, mode, process)
            )
        return self.lr_scheduler

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs):
        path = resume_from_checkpoint
        if path is True:
            path = get_last_checkpoint(self.args.output_dir)
            if path is None:
                raise ValueError(f"No checkpoint found in {self.args.output_dir} to resume from.")
        if path:
            state = self._checkpoint_state(str(path))
            self.rounds.restore(state, str(path))
            self._pending_merge = state.get("pending_merge")
        self.rounds.reset_rounds_file(keep=len(self.round_records) if path else 0)
        output = super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
        self.activate(MERGED)
        return output

    def _checkpoint_state(self, path: str) -> dict[str, Any]:
        """A checkpoint's round state, refused unless this run continues it exactly: the same
        tasks, round ends and process count (another would read other rows, in another order)."""
        state_file = os.path.join(path, STATE_FILE)
        if not os.path.isfile(state_file):
            raise ValueError(f"{path} is not a MetisTrainer checkpoint (no {STATE_FILE}).")
        with open(state_file) as handle:
            state = json.load(handle)
        expected = {
            "tasks": self.task_names,
            "round_ends": self.plan.round_ends,
            "world_size": self.args.world_size,
        }
        for key, value in expected.items():
            if key in state and state[key] != value:  # older checkpoints lack the last two: not checked
                raise ValueError(
                    f"{path} was saved by a run with {key} {state[key]}; this run has {value}. Resume it "
                    f"with the same settings{' and process count' if key == 'world_size' else ''}."
                )
        return state

    def train_to_branch_point(self, round_index: int = 0, resume_from_checkpoint: str | None = None) -> str:
        """Train up to the last step of round ``round_index`` (0-based) and checkpoint there, before
        its merge; return the checkpoint folder. Trainers whose settings differ from this one's
        only in ``MERGE_ONLY_SETTINGS`` continue from it with ``train(resume_from_checkpoint=...)``:
        they merge that round with their own method and train on, exactly as an unbranched run.
        ``resume_from_checkpoint``: an earlier checkpoint of this same trunk, interrupted."""
        if not 0 <= round_index < self.plan.rounds:
            raise ValueError(f"round_index {round_index} is outside the run's {self.plan.rounds} rounds.")
        branch_point = os.path.join(self.args.output_dir, f"checkpoint-{self.plan.round_ends[round_index]}")
        if resume_from_checkpoint and os.path.realpath(resume_from_checkpoint) == os.path.realpath(
            branch_point
        ):
            return branch_point  # interrupted after its last checkpoint: nothing left to train
        self._branch_round = round_index
        try:
            self.train(resume_from_checkpoint=resume_from_checkpoint)
        finally:
            self._branch_round = None
        return branch_point

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Checkpoints (internal calls) hold every adapter. A user call writes the merged adapter
        (PEFT, safetensors) at ``output_dir``; with ``save_task_adapters``, each task's adapter in
        ``output_dir/task_adapters/<task>``; with ``save_merged_model``, the full model with the
        merged adapter folded in at ``output_dir/merged_model``."""
        if _internal_call:
            return super().save_model(output_dir, _internal_call)
        output_dir = output_dir or self.args.output_dir
        if not self.is_world_process_zero():
            return None
        peft_model = self.peft_model
        os.makedirs(output_dir, exist_ok=True)
        if self.rounds.folded:
            self.rounds.save_folded_adapter(output_dir)
        else:
            peft_model.save_pretrained(output_dir, selected_adapters=[MERGED])
        self.processing_class.save_pretrained(output_dir)
        if self.args.save_task_adapters:
            for task in self.task_names:
                peft_model.save_pretrained(
                    os.path.join(output_dir, "task_adapters"), selected_adapters=[task]
                )
        if self.args.save_merged_model:
            self._save_merged_model(os.path.join(output_dir, "merged_model"))
        return None

    def push_to_hub(
        self,
        commit_message: str | None = "End of training",
        blocking: bool = True,
        token: str | None = None,
        revision: str | None = None,
        private: bool | None = None,
        **kwargs: Any,
    ) -> str | None:
        """Push the merged adapter with its model card (method, settings, per-round table) to
        ``repo_id=`` or ``args.hub_model_id``. The token is ``token``, ``args.hub_token`` or
        huggingface_hub's usual sources. Returns the repository URL (None off the main process)."""
        import tempfile

        import yaml

        from metis_hf.hub import card_info_for, check_repo_id, push_folder, write_card

        repo_id = kwargs.pop("repo_id", None) or self.args.hub_model_id
        if not repo_id:
            raise ValueError("push_to_hub needs a repository: MetisConfig(hub_model_id=...) or repo_id=...")
        check_repo_id(repo_id)
        if not self.is_world_process_zero():
            return None
        lora = self.peft_model.peft_config[MERGED]
        settings = {name: getattr(self.args, name) for name in CARD_SETTINGS}
        settings["lora"] = {
            "r": lora.r,
            "lora_alpha": lora.lora_alpha,
            "target_modules": sorted(lora.target_modules),
        }
        with tempfile.TemporaryDirectory(prefix="metis-hf-push-") as folder:
            self.save_model(folder)
            info = card_info_for(
                "adapter",
                self.args.merge_method,
                self.args.protocol,
                lora.base_model_name_or_path or self.peft_model.get_base_model().config._name_or_path or None,
                tasks=list(self.task_names),
                config_text=yaml.safe_dump(settings, sort_keys=False),
                config_title="Training settings",
                rounds=self.round_records,
            )
            write_card(folder, info)
            result = push_folder(
                folder,
                repo_id,
                private=bool(private if private is not None else self.args.hub_private_repo),
                revision=revision or self.args.hub_revision,
                commit_message=commit_message,
                token=token or self.args.hub_token,
            )
        return result.url

    def end(self) -> None:
        """Finish the trackers and destroy the process group, as Trainer.end does, after dropping
        the DistributedDataParallel wrapper: it holds the group, whose gloo threads would otherwise
        outlive ``end()`` and be torn down during the interpreter's exit, where they can abort the
        process (SIGABRT, "terminate called without an active exception") after a finished run."""
        self.model_wrapped = self.model
        self.accelerator.free_memory()  # the accelerator's own references to the prepared objects
        super().end()

    # --- rounds -------------------------------------------------------------------------------

    def _per_task_gradients(self, optimizer, args, kwargs) -> None:
        """Parallel schedule, before each optimizer step: the batch loss was normalised by every
        task's tokens together; adapter t's gradient comes from its own rows only, so scaling it by
        ``all tokens / task t's tokens`` gives exactly task t's own normalised loss. Then each
        adapter is clipped on its own."""
        counts = torch.tensor(self._step_tokens, dtype=torch.float64)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(counts)
        total = float(counts.sum())
        peft_model = self.peft_model
        for t, task in enumerate(self.task_names):
            params = [p for p in lora_parameters(peft_model, task).values() if p.grad is not None]
            for p in params:
                p.grad.mul_(total / max(float(counts[t]), 1.0))
            if self._clip_norm and self._clip_norm > 0 and params:
                torch.nn.utils.clip_grad_norm_(params, self._clip_norm)
        self._step_tokens = [0] * len(self.task_names)

    @property
    def peft_model(self) -> PeftModel:
        return self.accelerator.unwrap_model(self.model)

    def activate(self, adapter: str) -> None:
        """Make ``adapter`` the one the forward uses. PEFT's set_adapter also switches off the
        gradients of the others; the task adapters keep theirs (the optimizer holds them all, and
        under DDP every rank must agree on which parameters require gradients)."""
        peft_model = self.peft_model
        if peft_model.active_adapter != adapter:
            peft_model.set_adapter(adapter)
            for task in self.task_names:
                for p in lora_parameters(peft_model, task).values():
                    p.requires_grad_(True)

    def _at_branch_point(self) -> bool:
        branch = self._branch_round
        return branch is not None and self.state.global_step == self.plan.round_ends[branch]

    def _save_round_state(self, checkpoint_dir: str) -> None:
        state = {
            "tasks": self.task_names,
            "round_ends": self.plan.round_ends,
            "world_size": self.args.world_size,
            "global_step": self.state.global_step,
            **self.rounds.state(),
            # A trunk's checkpoint at its branch point: the merge there is the resumed run's first act.
            "pending_merge": self._branch_round if self._at_branch_point() else None,
        }
        with open(os.path.join(checkpoint_dir, STATE_FILE), "w") as handle:
            json.dump(state, handle, indent=2)
        self.rounds.save_folded(checkpoint_dir)

    def _save_merged_model(self, output_dir: str) -> None:
        merged = copy.deepcopy(self.peft_model)
        merged.set_adapter(MERGED)
        for task in self.task_names:
            merged.delete_adapter(task)
        merged.merge_and_unload().save_pretrained(output_dir, safe_serialization=True)
        self.processing_class.save_pretrained(output_dir)


class _RoundCallback(TrainerCallback):
    def __init__(self, trainer: MetisTrainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        trainer = self.trainer
        if trainer._pending_merge is not None:  # resumed from a branch point: its merge comes first
            round_index, trainer._pending_merge = trainer._pending_merge, None
            trainer.rounds.end_round(round_index)

    def on_step_end(self, args, state, control, **kwargs):
        trainer = self.trainer
        if state.global_step not in trainer.plan.round_ends:
            if trainer.task_parallel:  # mid-round, each process holds only its own tasks' adapters
                control.should_save = False
            return
        round_index = trainer.plan.round_ends.index(state.global_step)
        if trainer.task_parallel and args.save_strategy != "no":
            control.should_save = True  # the adapters are in sync at a round's end only: save there
        if round_index == trainer._branch_round:
            control.should_save = control.should_training_stop = True
            return
        trainer.rounds.end_round(round_index)

    def on_save(self, args, state, control, **kwargs):
        if self.trainer.is_world_process_zero():
            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            if os.path.isdir(folder):
                self.trainer._save_round_state(folder)


def _route_rows(peft_model: PeftModel, adapter_names: list[str]) -> list:
    """Forward each batch row through its own adapter (PEFT's mixed-batch forward); returns the
    hooks' handles, to remove after the step."""
    from peft.tuners.lora import LoraLayer

    def hook(module, args, kwargs):
        kwargs["adapter_names"] = adapter_names
        return args, kwargs

    return [
        m.register_forward_pre_hook(hook, with_kwargs=True)
        for m in peft_model.modules()
        if isinstance(m, LoraLayer)
    ]


def training_signature(args: MetisConfig) -> dict[str, Any]:
    """The settings that decide training up to the first merge: runs with equal signatures (and
    the same data) can share a branch point (``MetisTrainer.train_to_branch_point``)."""
    return {k: v for k, v in args.to_dict().items() if k not in MERGE_ONLY_SETTINGS}


def _check_tasks(
    args: MetisConfig, train: Mapping[str, Dataset], validation: Mapping[str, Dataset] | None
) -> list[str]:
    if not isinstance(train, Mapping) or not train:
        raise ValueError("train_dataset must be a non-empty mapping of task name -> dataset.")
    names = list(train)
    for name in names:
        # Task names become adapter names and folder names (task_adapters/<task>).
        if not isinstance(name, str) or not re.fullmatch(r"[\w-]+", name) or name == MERGED:
            raise ValueError(
                f"Task name {name!r} is not usable as an adapter and folder name (letters, digits, _ "
                f"and - only; not {MERGED!r})."
            )
        _check_dataset(train[name], f"train_dataset[{name!r}]")
        if len(train[name]) == 0:
            raise ValueError(f"Task {name!r} has no training data.")
    if validation is not None:
        if not isinstance(validation, Mapping):
            raise ValueError(
                f"eval_dataset must be a mapping of task name -> dataset, got {type(validation).__name__}."
            )
        if set(validation) != set(names):
            raise ValueError(
                f"train and eval task names differ: train has {sorted(names)}, eval has {sorted(validation)}."
            )
        for name in names:
            _check_dataset(validation[name], f"eval_dataset[{name!r}]")
            if len(validation[name]) == 0:
                raise ValueError(f"Task {name!r} has an empty validation set.")
    elif get_merge_method(args.merge_method).uses_loss_gaps:
        raise ValueError(
            f"{args.merge_method} needs eval_dataset (a validation set per task) to measure its loss gaps."
        )
    elif any(AUTO in (value if isinstance(value, list) else [value]) for value in args.merge_params.values()):
        raise ValueError("a merge scale set to 'auto' is chosen on eval_dataset (a validation set per task).")
    return names


def _check_dataset(dataset: Any, where: str) -> None:
    if not isinstance(dataset, Dataset):
        raise ValueError(
            f"{where} is a {type(dataset).__name__}, not a datasets.Dataset; wrap rows with "
            "datasets.Dataset.from_list(rows) (prompt and completion columns)."
        )


def gaps_on_completion(args: MetisConfig) -> bool:
    """Whether validation losses (the gaps, a scale search) are measured on the answer tokens."""
    return bool(args.completion_only_loss) or args.gap_tokens == "completion"


def scored_examples(
    tokenizer, dataset: Dataset, name: str, completion_only: bool, max_length: int | None
) -> Dataset:
    """``dataset`` tokenized and cut at ``max_length``, without the examples that keep no scored
    token (an error when none keeps one): what training and the validation losses read."""
    tokenized = tokenize_dataset(tokenizer, dataset, max_length or 10**9, name)
    return _drop_untrained(tokenized, name, completion_only, max_length)


def _drop_untrained(tokenized: Dataset, name: str, completion_only: bool, max_length: int | None) -> Dataset:
    """The examples that keep at least one scored token after truncation (completion tokens when
    ``completion_only``), with a warning that counts the others."""
    if not completion_only:
        cut = sum(1 for mask in tokenized["completion_mask"] if not any(mask))
        if cut:
            logger.warning(
                "%s: %d of %d examples lose their whole answer to max_length=%s: all-token training "
                "reads only their cut prompts. Raise max_length or shorten the prompts.",
                name,
                cut,
                len(tokenized),
                max_length,
            )
    if completion_only:
        keep = [i for i, mask in enumerate(tokenized["completion_mask"]) if any(mask)]
    else:
        keep = [i for i, ids in enumerate(tokenized["input_ids"]) if ids]
    if len(keep) == len(tokenized):
        return tokenized
    if not keep:
        raise ValueError(
            f"{name}: no example has a {'completion ' if completion_only else ''}token left within "
            f"max_length={max_length}; raise max_length or shorten the prompts."
        )
    logger.warning(
        "%s: %d of %d examples have no %stoken within max_length=%s (the prompt fills it) and are dropped.",
        name,
        len(tokenized) - len(keep),
        len(tokenized),
        "completion " if completion_only else "",
        max_length,
    )
    return tokenized.select(keep)


def _sorted_by_length(tokenized: Dataset) -> Dataset:
    lengths = [len(ids) for ids in tokenized["input_ids"]]
    return tokenized.select(sorted(range(len(lengths)), key=lengths.__getitem__))


def _build_adapters(model: torch.nn.Module, config: LoraConfig, tasks: list[str]) -> PeftModel:
    """G (``default``) and one adapter per task, all from one initialisation (copied)."""
    peft_model = get_peft_model(model, config, adapter_name=MERGED)
    initial = {k: p.detach().clone() for k, p in lora_parameters(peft_model, MERGED).items()}
    for task in tasks:
        peft_model.add_adapter(task, config)
        load_lora_state(peft_model, initial, task)
    peft_model.set_adapter(MERGED)
    return peft_model


def make_round_plan(
    args: MetisConfig, tasks: list[str], sizes: list[int], rows_per_task: int, world_size: int | None = None
) -> RoundPlan:
    """The run's rounds; ``world_size``: the process count to plan for (default: this run's)."""
    task_parallel = args.task_schedule == "task_parallel"
    world_size = world_size or args.world_size
    processes = world_size if task_parallel else 1
    # A task's step takes micro-batches from every process, except in task_parallel (its own only).
    per_step = rows_per_task * args.gradient_accumulation_steps * (1 if task_parallel else world_size)
    if args.local_steps is not None:
        steps = [args.local_steps] * len(tasks)
    else:
        steps = [max(1, math.ceil(n * args.local_epochs / per_step)) for n in sizes]
    if args.protocol == "post_hoc":  # the same optimizer steps per task, one merge at the end
        steps, rounds = [s * args.num_rounds for s in steps], 1
    else:
        rounds = args.num_rounds
    return RoundPlan(tasks, steps, rounds=rounds, schedule=args.task_schedule, processes=processes)
