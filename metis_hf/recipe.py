"""Recipes: YAML files validated into pydantic dataclasses, ``--set key.path=value`` overrides,
and the MetisConfig and LoraConfig a recipe describes.

An unknown key or a value of the wrong type fails with the key's path (``tasks[2].train_size``).
YAML is read with ``yaml.safe_load`` only.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import re
from dataclasses import field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationInfo, field_validator, model_validator

from metis_hf.data import TaskSpec
from metis_hf.models import DEFAULT_MODEL
from metis_hf.schema import Count, Integer, Number, RecipeError, check_fields, config_dataclass, parse
from metis_hf.scoring import METRICS, get_metric


@config_dataclass
class HarnessScore:
    """One score from lm-evaluation-harness: the mean of ``metric`` over ``tasks``."""

    name: str = field(metadata={"help": "Column name in tables, e.g. M-MMLU."})
    tasks: list[str] = field(
        default_factory=list, metadata={"help": "Harness task names averaged (at least one)."}
    )
    metric: str = field(default="acc,none", metadata={"help": "Harness metric key, e.g. 'acc,none'."})
    expert: str | None = field(
        default=None, metadata={"help": "The training task whose expert normalizes this score."}
    )
    num_fewshot: Integer | None = field(default=None, metadata={"help": "Few-shot examples (task default)."})

    @field_validator("tasks")
    @classmethod
    def _some_tasks(cls, tasks: list[str]) -> list[str]:
        if not tasks:
            raise ValueError("name at least one harness task")
        return tasks


@config_dataclass
class RetentionSpec:
    """A task no expert trains on, scored for the base and every merged model (merged / base):
    a BIG-bench multiple-choice task (by name from the cache, or a task.json path) or harness tasks."""

    name: str = field(metadata={"help": "Column name in the retention table."})
    bigbench: str | None = field(
        default=None, metadata={"help": "BIG-bench task name, e.g. date_understanding."}
    )
    path: str | None = field(default=None, metadata={"help": "A task.json file in BIG-bench's format."})
    harness: list[str] = field(
        default_factory=list, metadata={"help": "lm-evaluation-harness tasks averaged, e.g. [pubmedqa]."}
    )
    metric: str = field(default="acc,none", metadata={"help": "Harness metric key (harness tasks only)."})
    size: Count | None = field(
        default=200, metadata={"help": "Examples scored (sampled with seed); all if null."}
    )
    seed: Integer = field(default=0, metadata={"help": "Sampling seed."})

    @model_validator(mode="after")
    def _one_source(self) -> RetentionSpec:
        given = [k for k in ("bigbench", "path", "harness") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError(f"give exactly one of bigbench, path or harness (got {given or 'none'})")
        return self


@config_dataclass
class EvaluationSpec:
    split: str = field(default="test", metadata={"help": "Split scored by generation."})
    limit: Count | None = field(default=None, metadata={"help": "Score at most this many examples per task."})
    batch_size: Count = field(default=32, metadata={"help": "Generation batch size."})
    max_new_tokens: Count = field(default=24, metadata={"help": "Longest generated answer, in tokens."})
    harness: list[HarnessScore] = field(
        default_factory=list, metadata={"help": "lm-evaluation-harness scores (extra lm-eval)."}
    )
    generation: bool = field(
        default=True, metadata={"help": "Score each training task by generation on its test split."}
    )
    harness_limit: Count | None = field(default=None, metadata={"help": "Harness examples per task."})
    harness_batch_size: Count = field(default=8, metadata={"help": "Harness batch size."})
    harness_include: str | None = field(
        default=None, metadata={"help": "A folder of custom harness task YAMLs (e.g. over local files)."}
    )
    retention: list[RetentionSpec] = field(
        default_factory=list,
        metadata={"help": "Tasks outside the training set, scored for the base and every merge (compare)."},
    )

    @field_validator("generation")
    @classmethod
    def _something_to_score(cls, generation: bool, info: ValidationInfo) -> bool:
        if not generation and not info.data.get("harness"):
            raise ValueError("with generation off, list harness scores to evaluate")
        return generation


BASELINES = ["task_arithmetic", "ties", "dare_ties", "consensus_ta"]


def _known_methods() -> list[str]:
    from metis_hf.merging import available_methods

    return available_methods()


@config_dataclass
class CompareSpec:
    """What ``metis-hf compare`` runs: post-hoc merges of the experts and many-shot runs."""

    seeds: list[Integer] = field(default_factory=lambda: [0], metadata={"help": "Training seeds; paired."})
    variants: dict[str, dict[str, Any]] = field(
        default_factory=dict,
        metadata={
            "help": "Name -> {method: <registered method>, <merge parameters>, training: {<MetisConfig "
            "fields>}}: a method run under its own name, e.g. {task_arithmetic@0.5: {method: "
            "task_arithmetic, scale: 0.5}} for a scale sweep; list the name in post_hoc_methods or "
            "many_shot_methods. 'training' (optional) overrides the recipe's training section for "
            "that variant's runs, e.g. {gap_tokens: completion}."
        },
    )
    post_hoc_methods: list[str] = field(
        default_factory=lambda: list(BASELINES), metadata={"help": "Methods merging the experts once."}
    )
    many_shot_methods: list[str] = field(
        default_factory=lambda: [*BASELINES, "metis"],
        metadata={"help": "Methods run many-shot (merging every round)."},
    )
    method_params: dict[str, dict[str, Any]] = field(
        default_factory=dict,
        metadata={"help": "Method -> merge parameters, e.g. {ties: {density: 0.2}}; both protocols."},
    )
    paired_with_every_run: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Many-shot methods (or variants) the report pairs with every other run, seed by "
            "seed, with intervals; the loss-gap methods (METIS and its kin) always are."
        },
    )
    metric: str = field(
        default="exact_match",
        metadata={"help": f"Score normalized in the tables: one of {', '.join(METRICS)}."},
    )
    task_weights: dict[str, Number] = field(
        default_factory=dict, metadata={"help": "Task -> weight in Avg (default 1 each)."}
    )
    experts: str | dict[str, str] | None = field(
        default=None,
        metadata={
            "help": "Experts already trained, instead of training them: {task: PEFT adapter folder} "
            "(the same experts for every seed), or a previous compare's output folder (each seed's own)."
        },
    )
    multitask_sft: bool = field(
        default=True,
        metadata={
            "help": "Also train one adapter on all tasks' data mixed, for the optimizer steps of all "
            "experts together (the joint-training reference row)."
        },
    )
    branch_many_shot: bool = field(
        default=True,
        metadata={
            "help": "Train round 1 once per seed for the many-shot runs that differ only in how they "
            "merge, and branch each from it before its first merge (the same results, less training)."
        },
    )
    checkpoint_steps: Count | None = field(
        default=50,
        metadata={
            "help": "Runs that train (experts, multi-task SFT, many-shot) checkpoint every this many "
            "optimizer steps, and a compare started again resumes an interrupted run from its latest "
            "checkpoint (the same results); null: an interrupted run starts over."
        },
    )

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, seeds: list[int]) -> list[int]:
        if not seeds or len(set(seeds)) != len(seeds):
            raise ValueError(f"must be a non-empty list of distinct integers, got {seeds!r}")
        return seeds

    @field_validator("variants")
    @classmethod
    def _variants(cls, variants: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        known = _known_methods()
        for name, variant in variants.items():
            if name in known:
                raise ValueError(f"{name!r} is a registered method; give the variant another name")
            if not re.fullmatch(r"[A-Za-z0-9_.@=+-]+", name):
                raise ValueError(f"{name!r} names a run folder: use letters, digits and _ . @ = + -")
            if variant.get("method") not in known:
                raise ValueError(f"{name!r} needs 'method', one of {', '.join(known)}; got {variant!r}")
            if not isinstance(variant.get("training", {}), dict):
                raise ValueError(f"{name!r}: 'training' must be a mapping of MetisConfig fields")
        return variants

    @field_validator("post_hoc_methods", "many_shot_methods")
    @classmethod
    def _methods(cls, methods: list[str], info: ValidationInfo) -> list[str]:
        known, variants = _known_methods(), info.data.get("variants", {})
        for method in methods:
            if method not in known and method not in variants:
                raise ValueError(
                    f"unknown merge method {method!r} (known: {', '.join(known)}; "
                    f"variants: {', '.join(variants) or 'none'})"
                )
        if info.field_name == "many_shot_methods" and not methods and not info.data.get("post_hoc_methods"):
            raise ValueError("compare needs at least one post-hoc or many-shot method")
        return methods

    @field_validator("metric")
    @classmethod
    def _metric(cls, metric: str) -> str:
        get_metric(metric)
        return metric

    @field_validator("paired_with_every_run")
    @classmethod
    def _paired(cls, names: list[str], info: ValidationInfo) -> list[str]:
        many_shot = info.data.get("many_shot_methods", [])
        for name in names:
            if name not in many_shot:
                raise ValueError(f"{name!r} is not in many_shot_methods ({', '.join(many_shot) or 'none'})")
        return names

    @field_validator("method_params")
    @classmethod
    def _method_params(cls, method_params: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        unknown = sorted(set(method_params) - set(_known_methods()))
        if unknown:
            raise ValueError(f"unknown merge method {unknown[0]!r}")
        return method_params

    def resolve(self, name: str) -> tuple[str, dict[str, Any]]:
        """The registered method and merge parameters behind a name in the method lists."""
        if name in self.variants:
            params = dict(self.variants[name])
            params.pop("training", None)
            return params.pop("method"), params
        return name, dict(self.method_params.get(name, {}))

    def training_overrides(self, name: str) -> dict[str, Any]:
        """The MetisConfig fields a variant sets for its own runs (none for a plain method)."""
        return dict(self.variants.get(name, {}).get("training", {}))


@config_dataclass
class Recipe:
    model: str = field(default=DEFAULT_MODEL, metadata={"help": "Built-in name, Hub id or local path."})
    seed: Integer = field(default=0, metadata={"help": "Seed for training and sampling."})
    tasks: list[TaskSpec] = field(default_factory=list, metadata={"help": "The tasks to train and merge."})
    evaluation: EvaluationSpec = field(default_factory=EvaluationSpec)
    lora: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "peft.LoraConfig keyword arguments."}
    )
    training: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "MetisConfig keyword arguments."}
    )
    compare: CompareSpec = field(
        default_factory=CompareSpec, metadata={"help": "The grid of `metis-hf compare`."}
    )

    @field_validator("tasks")
    @classmethod
    def _some_tasks(cls, tasks: list[TaskSpec]) -> list[TaskSpec]:
        if not tasks:
            raise ValueError("a recipe needs at least one task")
        return tasks

    @field_validator("evaluation")
    @classmethod
    def _experts_are_tasks(cls, evaluation: EvaluationSpec, info: ValidationInfo) -> EvaluationSpec:
        names = [t.name for t in info.data.get("tasks", [])]
        for score in evaluation.harness:
            if score.expert is not None and score.expert not in names:
                raise ValueError(f"harness score {score.name!r}: its expert {score.expert!r} is not a task")
        return evaluation

    @field_validator("compare")
    @classmethod
    def _weights_name_scores(cls, compare: CompareSpec, info: ValidationInfo) -> CompareSpec:
        scored = [t.name for t in info.data.get("tasks", [])]
        scored += [s.name for s in getattr(info.data.get("evaluation"), "harness", [])]
        for task in compare.task_weights:
            if task not in scored:
                raise ValueError(
                    f"task_weights names {task!r}, which is not a task or harness score of this recipe"
                )
        return compare


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.path=value`` overrides; values are parsed as YAML (``3``, ``0.5``, ``[a, b]``)."""
    data = copy.deepcopy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        parts = key.split(".")
        if not sep or not all(parts):
            raise RecipeError(f"--set {item!r}: expected KEY.PATH=VALUE")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as err:
            problem = getattr(err, "problem", None) or "not valid YAML"
            raise RecipeError(f"--set {key}: the value {raw!r} is not valid YAML ({problem})") from None
        node: Any = data
        for depth, part in enumerate(parts):
            where = ".".join(parts[:depth]) or "the recipe"
            last = depth == len(parts) - 1
            if isinstance(node, list):
                if not re.fullmatch(r"\d+", part):
                    raise RecipeError(f"--set {key}: {where} is a list; {part!r} is not an index")
                if int(part) >= len(node):
                    raise RecipeError(
                        f"--set {key}: {where} has {len(node)} entries, so index {part} does not exist"
                    )
                index: int | str = int(part)
            elif isinstance(node, dict):
                index = part
                if not last:
                    node.setdefault(part, {})
            else:
                raise RecipeError(
                    f"--set {key}: {where} is a {type(node).__name__} ({node!r}), not a mapping or list"
                )
            if last:
                node[index] = value
            else:
                node = node[index]
    return data


def default_recipe_path() -> Path:
    """The embedded offline default (the same file as recipes/offline/cpu-3tasks.yaml)."""
    return Path(str(resources.files("metis_hf") / "resources" / "offline_default.yaml"))


def load_recipe_dict(path: str | Path | None = None, overrides: list[str] | None = None) -> dict[str, Any]:
    path = Path(path) if path is not None else default_recipe_path()
    if not path.is_file():
        raise FileNotFoundError(f"Recipe {str(path)!r} does not exist.")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise RecipeError(f"{path}: not valid YAML: {err}") from err
    return apply_overrides(data, overrides or [])


def load_recipe(path: str | Path | None = None, overrides: list[str] | None = None) -> Recipe:
    return parse(Recipe, load_recipe_dict(path, overrides))


# --- from a recipe to the configs it describes ------------------------------------------------


def metis_config_from_recipe(recipe: Recipe, output_dir: str | os.PathLike, **extra: Any):
    from metis_hf.training.config import MetisConfig

    training = check_fields(MetisConfig, {**recipe.training, **extra}, "training")
    values = {"seed": recipe.seed, "disable_tqdm": False, "logging_steps": 10, **training}
    try:
        return MetisConfig(output_dir=str(output_dir), **values)
    except (TypeError, ValueError) as err:
        raise RecipeError(f"training: {err}") from err


def compare_merge_spec(recipe: Recipe, name: str):
    """The merge setting of a name in compare's method lists: a variant's own; for the training
    section's method, what the training section states beyond the run defaults, then
    ``compare.method_params`` over it; for another method, its ``compare.method_params``."""
    from metis_hf.merging.spec import MergeSpec

    method, params = recipe.compare.resolve(name)
    if name not in recipe.compare.variants:
        training = metis_config_from_recipe(recipe, "compare", use_cpu=True).merge_spec
        if method == training.method:
            params = {**training.beyond_defaults(len(recipe.tasks)), **params}
    return MergeSpec(method, params)


def lora_config_from_recipe(recipe: Recipe):
    from peft import LoraConfig

    from metis_hf.training.lora import check_lora_config, default_lora_config

    allowed = {f.name for f in dataclasses.fields(LoraConfig) if f.init}
    values = {**default_lora_config().to_dict(), **check_fields(LoraConfig, recipe.lora, "lora")}
    try:
        config = LoraConfig(**{k: v for k, v in values.items() if k in allowed})
        check_lora_config(config, where="lora")
    except (TypeError, ValueError) as err:
        raise RecipeError(f"lora: {err}".replace("lora: lora.", "lora.")) from err
    return config


def recipe_text(recipe_path: str | os.PathLike | None, overrides: list[str] | None = None) -> str:
    """The recipe file verbatim, with the command line's overrides appended as comments."""
    text = Path(recipe_path or default_recipe_path()).read_text().rstrip()
    return text + "".join(f"\n# --set {o}" for o in overrides or [])


def recipe_datasets(recipe: Recipe) -> list[str]:
    """The Hub datasets a recipe trains on (for a card's front matter)."""
    return sorted({t.dataset for t in recipe.tasks if t.source == "hub" and t.dataset})
