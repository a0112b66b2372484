"""MetisConfig: SFTConfig plus the many-shot merging settings."""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from trl import SFTConfig

from metis_hf.merging import get_merge_method
from metis_hf.merging.spec import MergeSpec
from metis_hf.merging.task_vectors import check_method_space, check_space
from metis_hf.redact import register_secret
from metis_hf.training.rounds import check_merge_settings

PROTOCOLS = ("many_shot", "post_hoc")
TASK_SCHEDULES = ("sequential", "interleaved", "parallel", "task_parallel")
ROUND_LR_SCHEDULES = ("linear", "linear_across_rounds", "constant")
GAP_TOKENS = ("trained", "completion")
SCALE_OBJECTIVES = ("multitask_loss", "worst_task")
# Past these a run cannot finish (and its round plan would not fit in memory): a typo, not a recipe.
MAX_ROUNDS = 10_000
MAX_LOCAL_STEPS = 1_000_000
MERGE_PARAMETER_ALIASES = ("temperature", "delta", "k", "beta")


@dataclass
class MetisConfig(SFTConfig):
    r"""Configuration for :class:`MetisTrainer`: every ``SFTConfig`` field plus many-shot merging.

    Defaults follow the METIS reference code (docs/method.md §2): lr 3e-4, no warm-up, linear
    decay to 0 within each round, micro-batch 2 x 4 accumulation, sequences cut at 512 tokens,
    loss on all tokens, a fresh optimizer every round. ``bf16`` defaults to on only where a GPU
    supports it, and activation checkpointing is off.
    """

    protocol: str = field(
        default="many_shot",
        metadata={
            "help": "'many_shot': merge after every round; 'post_hoc': train each task for all rounds' "
            "steps from the base, merge once.",
            "choices": list(PROTOCOLS),
        },
    )
    num_rounds: int = field(default=5, metadata={"help": "Rounds R (the paper: 5)."})
    local_steps: int | None = field(
        default=None, metadata={"help": "Optimizer steps per task per round (overrides local_epochs)."}
    )
    local_epochs: float = field(
        default=1.0, metadata={"help": "Epochs over each task's data per round, when local_steps is unset."}
    )
    merge_method: str = field(
        default="metis", metadata={"help": "Any registered method, or 'mergekit:<name>'."}
    )
    # `dict | str | None`, as TrainingArguments' dict fields: HfArgumentParser then reads a JSON string.
    merge_params: dict[str, Any] | str | None = field(
        default=None,
        metadata={
            "help": 'The merge method\'s parameters (e.g. {"density": 0.2}; JSON on the command line); '
            "a list for a one-value parameter gives one value per round. Unset ones take the "
            "method's defaults."
        },
    )
    # Aliases of merge_params entries, for command lines (`--temperature 4 3 3 2 1`) and older
    # scripts. None: unset (the method's own default applies). Lists: one value, or one per round.
    temperature: list[float] | None = field(
        default=None,
        metadata={"help": "Alias of merge_params['temperature'] (METIS: 2.0): one number, or one per round."},
    )
    delta: float | None = field(
        default=None, metadata={"help": "Alias of merge_params['delta'] (the mask threshold; METIS: 0.3)."}
    )
    k: int | None = field(
        default=None, metadata={"help": "Alias of merge_params['k'] (the consensus count; METIS: 2)."}
    )
    beta: list[float] | None = field(
        default=None,
        metadata={
            "help": "Alias of merge_params['beta'] (METIS's final scale: 1.0): one number, or one per round."
        },
    )
    merge_space: str | None = field(
        default=None,
        metadata={
            "help": "'lora': merge LoRA A and B entries (the paper); 'dense': merge scaling*B@A per "
            "module and truncate back to rank r by SVD ('delta', its former name, still works); "
            "'core': the same updates in the bases the adapters span (exact, cheap). Default: "
            "'lora', or 'core' for methods on layer matrices (iso_c, iso_cts, tsv_m).",
        },
    )
    merge_round_updates: bool = field(
        default=False,
        metadata={
            "help": "Merge each round's updates instead of the adapters themselves. In the 'lora' "
            "space: each task adapter minus the merged adapter it started the round from, the merge "
            "added to the merged adapter (task arithmetic at scale 1/T is then FedAvg). In the "
            "'core' space: each task's update scaling * B @ A merged exactly (no truncation to rank "
            "r), added to the base weights, and every adapter restarted from zero; the result is "
            "saved as one adapter of the rounds' summed rank. A scale (or METIS's beta) of 'auto' "
            "is chosen every round on the validation loss.",
        },
    )
    scale_objective: str = field(
        default="multitask_loss",
        metadata={
            "help": "What a scale of 'auto' minimises each round, on the validation data: "
            "'multitask_loss', the merged adapter's mean loss over tasks; 'worst_task', the largest "
            "share of its round's gain any task loses in the merge, (merged - local) / (start - "
            "local) on each task's loss, where start is the merged adapter the round began from and "
            "local the task's own adapter after the round.",
            "choices": list(SCALE_OBJECTIVES),
        },
    )
    reset_optimizer_each_round: bool = field(
        default=True,
        metadata={"help": "Drop Adam moments at every round (the reference rebuilds its Trainer)."},
    )
    round_lr_schedule: str = field(
        default="linear",
        metadata={
            "help": "'linear': decay to 0 within each task's round (the reference); "
            "'linear_across_rounds': one decay to 0 over each task's steps of all rounds; 'constant'.",
            "choices": list(ROUND_LR_SCHEDULES),
        },
    )
    task_schedule: str = field(
        default="sequential",
        metadata={
            "help": "'sequential': each task's round in turn (the reference); 'interleaved': one "
            "optimizer step per task in turn; 'parallel': every task in every step, each row of a "
            "batched forward routed to its task's adapter (per_device_train_batch_size counts the rows "
            "of all tasks together and must be a multiple of the task count); 'task_parallel': under "
            "several processes, each trains its own tasks with no per-step communication and the "
            "processes exchange the task adapters once a round, before the merge.",
            "choices": list(TASK_SCHEDULES),
        },
    )
    gap_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Batch size of the loss-gap validation; default: per_device_train_batch_size "
            "(no gradients are kept, so the gap never needs more memory than a training step)."
        },
    )
    gap_tokens: str = field(
        default="trained",
        metadata={
            "help": "Tokens the loss gaps are measured on: 'trained' (those training uses: the "
            "reference) or 'completion' (the answer tokens, even under all-token training: the "
            "prompt tokens dominate an all-token loss, and only the answer is scored).",
            "choices": list(GAP_TOKENS),
        },
    )
    save_task_adapters: bool = field(
        default=False, metadata={"help": "save_model also writes each task's adapter."}
    )
    save_merged_model: bool = field(
        default=False,
        metadata={"help": "save_model also writes the full model with the merged adapter folded in."},
    )

    # SFTConfig fields whose defaults differ here (the reference recipe; CPU-friendly).
    learning_rate: float = field(default=3e-4, metadata={"help": "Peak learning rate of every round."})
    per_device_train_batch_size: int = field(default=2, metadata={"help": "Micro-batch size."})
    gradient_accumulation_steps: int = field(
        default=4, metadata={"help": "Micro-batches per optimizer step."}
    )
    max_length: int | None = field(default=512, metadata={"help": "Sequences are cut at this many tokens."})
    completion_only_loss: bool | None = field(
        default=False,
        metadata={"help": "Train (and measure gaps) on completion tokens only. Reference: all tokens."},
    )
    activation_checkpointing: bool | None = field(
        default=False, metadata={"help": "Activation checkpointing."}
    )
    gradient_checkpointing: bool | None = field(default=None, metadata={"help": "Deprecated alias."})
    bf16: bool | None = field(
        default=None, metadata={"help": "bf16 mixed precision; default: on where supported."}
    )
    save_strategy: str = field(
        default="no", metadata={"help": "Checkpoint strategy ('steps' to resume runs)."}
    )
    report_to: None | str | list[str] = field(default="none", metadata={"help": "Logging integrations."})

    def __post_init__(self) -> None:
        register_secret(self.hub_token)
        if self.merge_params is None:
            self.merge_params = {}
        elif isinstance(self.merge_params, str):
            try:
                self.merge_params = json.loads(self.merge_params)
            except json.JSONDecodeError as err:
                raise ValueError(
                    f"merge_params: {self.merge_params!r} is not a JSON object ({err})."
                ) from None
        if not isinstance(self.merge_params, dict):
            raise ValueError(f"merge_params must be a mapping, got {self.merge_params!r}.")
        if self.bf16 is None and not self.fp16:
            self.bf16 = bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {self.protocol!r}.")
        if self.task_schedule not in TASK_SCHEDULES:
            raise ValueError(f"task_schedule must be one of {TASK_SCHEDULES}, got {self.task_schedule!r}.")
        if self.round_lr_schedule not in ROUND_LR_SCHEDULES:
            raise ValueError(
                f"round_lr_schedule must be one of {ROUND_LR_SCHEDULES}, got {self.round_lr_schedule!r}."
            )
        if self.merge_space is None:
            self.merge_space = MergeSpec(self.merge_method).default_space
        try:
            self.merge_space = check_space(self.merge_space)
        except ValueError as err:
            raise ValueError(f"merge_space: {err}") from None
        if isinstance(self.num_rounds, bool) or not isinstance(self.num_rounds, int) or self.num_rounds < 1:
            raise ValueError(f"num_rounds must be an integer >= 1, got {self.num_rounds!r}.")
        if self.num_rounds > MAX_ROUNDS:
            raise ValueError(f"num_rounds must be at most {MAX_ROUNDS:,}, got {self.num_rounds:,}.")
        if self.local_steps is not None and not 1 <= self.local_steps <= MAX_LOCAL_STEPS:
            raise ValueError(f"local_steps must be from 1 to {MAX_LOCAL_STEPS:,}, got {self.local_steps}.")
        for name in ("per_device_train_batch_size", "gradient_accumulation_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
        if not (isinstance(self.learning_rate, (int, float)) and math.isfinite(self.learning_rate)):
            raise ValueError(f"learning_rate must be a finite number, got {self.learning_rate!r}.")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate!r}.")
        if self.max_length is not None and (isinstance(self.max_length, bool) or self.max_length < 2):
            raise ValueError(
                f"max_length must be at least 2 tokens (a prompt token and an answer token), or None "
                f"for no limit; got {self.max_length!r}."
            )
        if self.local_steps is None and not self.local_epochs > 0:
            raise ValueError(f"local_epochs must be > 0, got {self.local_epochs}.")
        if self.gap_batch_size is None:
            self.gap_batch_size = self.per_device_train_batch_size
        if self.gap_batch_size < 1:
            raise ValueError(f"gap_batch_size must be >= 1, got {self.gap_batch_size}.")
        if self.scale_objective not in SCALE_OBJECTIVES:
            raise ValueError(
                f"scale_objective must be one of {SCALE_OBJECTIVES}, got {self.scale_objective!r}."
            )
        if self.gap_tokens not in GAP_TOKENS:
            raise ValueError(f"gap_tokens must be one of {GAP_TOKENS}, got {self.gap_tokens!r}.")
        self._merge_params_from_aliases()
        check_method_space(self.merge_method, self.merge_space)
        if self.merge_round_updates and self.merge_space == "dense":
            raise ValueError(
                "merge_round_updates: merge_space 'dense' would truncate each round's update; 'core' "
                "merges the same updates exactly and folds them into the base weights."
            )
        if self.merge_round_updates and self.merge_space == "core":
            for name in ("save_task_adapters", "reset_optimizer_each_round"):
                if getattr(self, name) != (name == "reset_optimizer_each_round"):
                    raise ValueError(
                        f"merge_round_updates in the core space restarts every adapter from zero each "
                        f"round (the update is folded into the base): {name} must be "
                        f"{name == 'reset_optimizer_each_round'}."
                    )
        if self.packing:
            raise ValueError("packing is not supported: each optimizer step must hold one task's examples.")
        if self.shuffle_dataset:
            raise ValueError(
                "shuffle_dataset is not supported: the round plan draws each task's examples in its own "
                "seeded order, so the dataset's rows must stay in place."
            )
        super().__post_init__()

    def __getstate__(self) -> dict[str, Any]:
        # A pickled config (the Trainer's training_args.bin in every checkpoint) never holds the token.
        return {**self.__dict__, "hub_token": None}

    def __deepcopy__(self, memo: dict[int, Any]) -> MetisConfig:
        copied = object.__new__(type(self))  # copies in memory keep it (the Trainer pushes with it)
        memo[id(self)] = copied
        copied.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return copied

    def _merge_params_from_aliases(self) -> None:
        """Move the alias fields into ``merge_params`` and check every round's parameters with the
        method's own checks (on as many probe tasks as the parameters imply)."""
        method = get_merge_method(self.merge_method)  # unknown method: fails here
        for name in MERGE_PARAMETER_ALIASES:
            value = getattr(self, name)
            if value is None:
                continue
            if name in self.merge_params:
                raise ValueError(f"{name} is set twice: as a field and in merge_params; keep one.")
            if name not in method.parameters:
                raise ValueError(
                    f"{name}: {self.merge_method!r} has no parameter {name!r} (it takes: "
                    f"{', '.join(method.parameters) or 'none'})."
                )
            if isinstance(value, (list, tuple)) and len(value) == 1:
                value = value[0]
            self.merge_params[name] = list(value) if isinstance(value, (list, tuple)) else value
        # a loss-gap method's gaps (and the weights they give) come from training, not from the user
        reserved = (
            {"loss_gaps", "alphas", "reference_losses", "base_losses"} if method.uses_loss_gaps else set()
        )
        unknown = sorted(
            set(self.merge_params) - set(method.parameters) | (set(self.merge_params) & reserved)
        )
        if unknown:
            raise ValueError(
                f"merge_params has {unknown[0]!r}, which {self.merge_method!r} does not take here "
                f"(it takes: {', '.join(p for p in method.parameters if p not in reserved)})."
            )
        counts = {self.num_rounds, 1}
        for name, value in self.merge_params.items():
            if self.merge_spec.is_per_round(name) and len(value) not in counts:
                raise ValueError(
                    f"{name} has {len(value)} values for {self.num_rounds} rounds (give one, or one per round)."
                )
        check_merge_settings(self, [f"task{i}" for i in range(self._probe_task_count())])

    @property
    def merge_spec(self) -> MergeSpec:
        """The merge setting: ``merge_method`` with ``merge_params`` (the alias fields folded in)."""
        return MergeSpec(self.merge_method, self.merge_params)

    def _probe_task_count(self) -> int:
        """A task count the merge parameters fit before the real tasks are known: that of a
        per-task list, else enough for the largest k."""
        method = get_merge_method(self.merge_method)
        for name, value in self.merge_params.items():
            if name in method.per_task and isinstance(value, (list, tuple)):
                return len(value)
        ks = self.merge_params.get("k", 2)
        ks = ks if isinstance(ks, (list, tuple)) else [ks]
        return max([2, *(v for v in ks if isinstance(v, int) and not isinstance(v, bool))])
