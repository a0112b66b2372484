"""``metis-hf plan RECIPE``: a recipe checked without training, its round plan and what it costs.

Checks what can fail hours into a run (model and dataset ids, harness task names, training and
merge settings, compare methods and variants) without downloading models or data, then counts the
optimizer steps, sequences, validation passes and merges of one training run and estimates its
peak accelerator memory and tokens from the model's shape:

    weights      P_base x 4 bytes (the base loads in float32; fp16/bf16 are autocast)
    adapters     (T + 1) x P_lora x 4 bytes (one LoRA adapter per task and the merged one)
    gradients    P_lora x 4 bytes per adapter trained in a step (T in the parallel schedule)
    optimizer    2 x P_lora x 4 bytes per adapter trained (AdamW's two moments)
    activations  b x L x layers x (6 h + 2 h_kv + 4 I) x a bytes: what one decoder layer keeps
                 for the backward per token (norm, attention and MLP inputs and outputs; no
                 attention matrix, as with SDPA), a = 2 under fp16/bf16 autocast, else 4; b the
                 rows of one micro-batch, L = max_length (an upper bound: shorter sequences keep
                 less; ``--sequence-length`` estimates at a typical length)

with P_lora = layers x sum over target modules of r x (in + out). The logits are not counted:
TRL's fused LM head computes the loss in chunks.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from metis_hf.models import BUILTIN_MODELS, builtin_folder
from metis_hf.recipe import (
    Recipe,
    RecipeError,
    compare_merge_spec,
    lora_config_from_recipe,
    metis_config_from_recipe,
)

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied_embeddings: bool
    source: str = "table"

    @classmethod
    def from_config(cls, config: dict[str, Any], source: str) -> ModelShape:
        heads = config["num_attention_heads"]
        return cls(
            hidden=config["hidden_size"],
            layers=config["num_hidden_layers"],
            intermediate=config["intermediate_size"],
            heads=heads,
            kv_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or config["hidden_size"] // heads,
            vocab=config["vocab_size"],
            tied_embeddings=bool(config.get("tie_word_embeddings", True)),
            source=source,
        )

    def module_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each projection in one decoder layer."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        h, i = self.hidden, self.intermediate
        return {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    def parameters(self) -> int:
        """Parameters of the projections and embeddings (norms are a rounding error)."""
        per_layer = sum(a * b for a, b in self.module_shapes().values())
        embeddings = self.vocab * self.hidden * (1 if self.tied_embeddings else 2)
        return self.layers * per_layer + embeddings


# From each model's config.json on the Hub: used when the config itself cannot be read (offline).
KNOWN_SHAPES = {
    "HuggingFaceTB/SmolLM2-135M-Instruct": ModelShape(576, 30, 1536, 9, 3, 64, 49152, True),
    "google/gemma-2-2b": ModelShape(2304, 26, 9216, 8, 4, 256, 256000, True),
    "meta-llama/Llama-3.2-3B": ModelShape(3072, 28, 8192, 24, 8, 128, 128256, True),
    "meta-llama/Llama-3.1-8B": ModelShape(4096, 32, 14336, 32, 8, 128, 128256, False),
    "Qwen/Qwen3-4B": ModelShape(2560, 36, 9728, 32, 8, 128, 151936, True),
}


def model_shape(model: str) -> ModelShape:
    """The model's shape from its config.json (a local folder, a built-in model, the Hub cache),
    else from metis-hf's table of the paper's backbones."""
    if model in BUILTIN_MODELS:
        hub_id = BUILTIN_MODELS[model].hub_id
        folder = builtin_folder(model)  # once converted; the plan never converts it
        if (folder / "config.json").is_file():
            return ModelShape.from_config(json.loads((folder / "config.json").read_text()), str(folder))
        return dataclasses.replace(KNOWN_SHAPES[hub_id], source=f"table ({hub_id})")
    if Path(model).is_dir():
        config = Path(model) / "config.json"
        if not config.is_file():
            raise RecipeError(f"model {model!r}: a folder without config.json")
        return ModelShape.from_config(json.loads(config.read_text()), str(config))
    if not HUB_ID.match(model):
        raise RecipeError(f"model {model!r}: no such folder, and not a Hub id (owner/name)")
    try:
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(model, "config.json")  # the cache, or the Hub when online
        return ModelShape.from_config(json.loads(Path(path).read_text()), f"{model} config.json")
    except Exception as err:  # offline and not cached: the table, if it knows the model
        if model in KNOWN_SHAPES:
            return dataclasses.replace(KNOWN_SHAPES[model], source=f"table ({model})")
        raise RecipeError(f"model {model!r}: cannot read its config.json ({type(err).__name__})") from err


def _check_datasets(recipe: Recipe) -> list[str]:
    problems = []
    for index, task in enumerate(recipe.tasks):
        sources = (
            [(f"tasks[{index}]", task.dataset, task.data_files)] if task.source != "reasoning_gym" else []
        )
        sources += [
            (f"tasks[{index}].mixture[{j}]", s.dataset, s.data_files) for j, s in enumerate(task.mixture)
        ]
        for where, dataset, files in sources:
            for path in (files or {}).values():
                if not Path(path).exists():
                    problems.append(f"{where}: data file {path!r} does not exist")
            if dataset and not (Path(dataset).exists() or HUB_ID.match(dataset)):
                problems.append(f"{where}: dataset {dataset!r} is neither a local path nor a Hub id")
    return problems


def _local_tokenizer_source(model: str) -> str | None:
    """Where the model's tokenizer can be read without loading, converting or downloading it."""
    folder = builtin_folder(model) if model in BUILTIN_MODELS else Path(model)
    return str(folder) if (folder / "tokenizer_config.json").is_file() else None


def _check_examples_keep_tokens(recipe: Recipe, args) -> list[str]:
    """Every task keeps examples with a scored token within max_length, as training requires.

    Local files: every split that training reads. Generated tasks: the validation split's first
    draw only, since drawing a training split can take a generator many seconds (number_sequence:
    17 s for 400 items); its prompts come from the same generator. Hub datasets, and models whose
    tokenizer is not at hand, are left to ``train``."""
    from datasets import Dataset
    from datasets.utils.logging import disable_progress_bar, enable_progress_bar, is_progress_bar_enabled

    from metis_hf.data import build_task, first_drawn_rows
    from metis_hf.models import load_tokenizer
    from metis_hf.training.trainer import gaps_on_completion, scored_examples

    # Without answer-token loss any kept token counts, and max_length is at least 1.
    splits = ["train"] * bool(args.completion_only_loss) + ["validation"] * gaps_on_completion(args)
    tasks = [(i, spec) for i, spec in enumerate(recipe.tasks) if spec.source != "hub" and not spec.mixture]
    source = _local_tokenizer_source(recipe.model)
    if source is None or not tasks or not splits:
        return []
    tokenizer = load_tokenizer(source)
    bars = is_progress_bar_enabled()
    disable_progress_bar()  # the plan prints its own lines only
    problems = []
    try:
        for index, spec in tasks:
            try:
                built = None if spec.source == "reasoning_gym" else build_task(spec)
            except (ValueError, OSError):
                continue  # a missing or broken file: _check_datasets or train names it
            for split in splits:
                if not getattr(spec, f"{split}_size") or (built is None and split == "train"):
                    continue
                rows = built.split(split) if built else Dataset.from_list(first_drawn_rows(spec, split))
                try:
                    scored_examples(
                        tokenizer, rows, f"tasks[{index}] ({spec.name}) {split}", True, args.max_length
                    )
                except ValueError as err:
                    problems.append(str(err))
    finally:
        if bars:
            enable_progress_bar()
    return problems


def _check_harness(recipe: Recipe) -> list[str]:
    ev = recipe.evaluation
    names = [t for h in ev.harness for t in h.tasks] + [t for r in ev.retention for t in r.harness]
    if not names:
        return []
    try:
        from metis_hf.evaluation.harness import task_manager

        known = task_manager(ev.harness_include).all_tasks
    except ImportError:
        return ["harness tasks not checked: lm-eval is not installed (pip install 'metis-hf[lm-eval]')"]
    return [f"evaluation: unknown harness task {name!r}" for name in names if name not in known]


def plan_recipe(
    recipe: Recipe, sequence_length: int | None = None, output_dir: str = "plan", processes: int = 1
) -> dict[str, Any]:
    """The checks, the round plan and the estimates of one training run of ``recipe`` on
    ``processes`` processes; activations at ``sequence_length`` tokens per sequence (default: the
    recipe's max_length, an upper bound)."""
    from metis_hf.training.trainer import make_round_plan

    # use_cpu: the settings are checked here, on whatever machine; fp16/bf16 are read from the recipe
    args = metis_config_from_recipe(recipe, output_dir, use_cpu=True)
    for name in {*recipe.compare.post_hoc_methods, *recipe.compare.many_shot_methods}:
        spec = compare_merge_spec(recipe, name)
        method, params = spec.method, dict(spec.params)
        params = {k: v for k, v in params.items() if v != "auto"}
        overrides = {**recipe.compare.training_overrides(name), "use_cpu": True}
        try:
            metis_config_from_recipe(
                recipe, output_dir, merge_method=method, merge_params=params, **overrides
            )
        except RecipeError as err:
            raise RecipeError(f"compare: {name}: {err}") from err
    lora = lora_config_from_recipe(recipe)
    shape = model_shape(recipe.model)
    problems = _check_datasets(recipe) + _check_harness(recipe) + _check_examples_keep_tokens(recipe, args)

    tasks = [t.name for t in recipe.tasks]
    count = len(tasks)
    parallel = args.task_schedule == "parallel"
    rows = args.per_device_train_batch_size // count if parallel else args.per_device_train_batch_size
    try:
        plan = make_round_plan(args, tasks, [t.train_size for t in recipe.tasks], rows, world_size=processes)
    except ValueError as err:
        raise RecipeError(f"training.task_schedule: {err}") from err
    micro_batches = args.gradient_accumulation_steps * processes
    sequences_per_step = (rows * count if parallel else rows) * micro_batches
    validation = sum(t.validation_size for t in recipe.tasks)
    rounds = plan.rounds
    validation_passes = 2 * rounds + 1 if args.protocol == "many_shot" else 2  # G_0, then local + merged
    length = sequence_length or args.max_length or 512

    modules = lora.target_modules if not isinstance(lora.target_modules, str) else [lora.target_modules]
    shapes = shape.module_shapes()
    unknown = [m for m in modules if m not in shapes]
    if unknown:
        problems.append(f"lora.target_modules: {unknown} are not projections of this model shape")
    lora_params = shape.layers * sum(lora.r * sum(shapes[m]) for m in modules if m in shapes)
    trained = count if parallel else 1
    autocast = bool(recipe.training.get("fp16") or recipe.training.get("bf16"))
    per_token = shape.layers * (
        6 * shape.hidden + 2 * shape.kv_heads * shape.head_dim + 4 * shape.intermediate
    )
    memory = {
        "weights": shape.parameters() * 4,
        "adapters": (count + 1) * lora_params * 4,
        "gradients": trained * lora_params * 4,
        "optimizer": trained * 2 * lora_params * 4,
        "activations": (rows * count if parallel else rows) * length * per_token * (2 if autocast else 4),
    }
    return {
        "recipe_model": recipe.model,
        "shape": dataclasses.asdict(shape),
        "problems": problems,
        "protocol": args.protocol,
        "schedule": args.task_schedule,
        "rounds": rounds,
        "merges": rounds,
        "tasks": tasks,
        "steps_per_task_per_round": dict(zip(tasks, plan.steps_per_task)),
        "optimizer_steps": plan.total_steps,
        "sequences_per_step": sequences_per_step,
        "training_sequences": plan.total_steps * sequences_per_step,
        "validation_sequences": validation_passes * validation,
        "sequence_length": length,
        "training_tokens_at_most": plan.total_steps * sequences_per_step * length,
        "base_parameters": shape.parameters(),
        "lora_parameters_per_adapter": lora_params,
        "memory_bytes": memory,
        "memory_total_bytes": sum(memory.values()),
    }


def _gib(value: float) -> str:
    return f"{value / 2**30:.2f} GiB"


def render_plan(plan: dict[str, Any]) -> str:
    steps = ", ".join(f"{t} {n}" for t, n in plan["steps_per_task_per_round"].items())
    memory = plan["memory_bytes"]
    lines = [
        f"model {plan['recipe_model']}: {plan['base_parameters'] / 1e9:.2f} B parameters "
        f"(shape from {plan['shape']['source']}); LoRA {plan['lora_parameters_per_adapter'] / 1e6:.2f} M per adapter",
        f"{plan['protocol']}, {plan['schedule']} schedule: {plan['rounds']} round(s), {plan['merges']} merge(s), "
        f"{plan['optimizer_steps']} optimizer steps",
        f"optimizer steps per task per round: {steps}",
        f"sequences: {plan['sequences_per_step']} per step, {plan['training_sequences']} trained, "
        f"{plan['validation_sequences']} validation forwards (loss gaps); at most "
        f"{plan['training_tokens_at_most'] / 1e6:.1f} M training tokens at {plan['sequence_length']} a sequence",
        "peak memory estimate (one process): "
        + ", ".join(f"{name} {_gib(value)}" for name, value in memory.items())
        + f"; total {_gib(plan['memory_total_bytes'])}",
    ]
    lines += [f"problem: {p}" for p in plan["problems"]]
    lines.append("plan: OK" if not plan["problems"] else f"plan: {len(plan['problems'])} problem(s)")
    return "\n".join(lines)
