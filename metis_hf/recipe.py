"""Recipes: YAML files validated into dataclasses, with ``--set key.path=value`` overrides.

An unknown key or a value of the wrong type fails with the key's path (``tasks[2].train_size``).
YAML is read with ``yaml.safe_load`` only.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from metis_hf.data import TaskSpec
from metis_hf.models import DEFAULT_MODEL


@dataclass
class HarnessScore:
    """One score from lm-evaluation-harness: the mean of ``metric`` over ``tasks``."""

    name: str = field(metadata={"help": "Column name in tables, e.g. M-MMLU."})
    tasks: list[str] = field(default_factory=list, metadata={"help": "Harness task names averaged."})
    metric: str = field(default="acc,none", metadata={"help": "Harness metric key, e.g. 'acc,none'."})
    expert: str | None = field(
        default=None, metadata={"help": "The training task whose expert normalizes this score."}
    )
    num_fewshot: int | None = field(default=None, metadata={"help": "Few-shot examples (task default)."})

    def __post_init__(self) -> None:
        if not self.tasks:
            raise ValueError(f"harness score {self.name!r}: tasks must name at least one harness task.")


@dataclass
class EvaluationSpec:
    split: str = field(default="test", metadata={"help": "Split scored by generation."})
    limit: int | None = field(default=None, metadata={"help": "Score at most this many examples per task."})
    batch_size: int = field(default=32, metadata={"help": "Generation batch size."})
    max_new_tokens: int = field(default=24, metadata={"help": "Longest generated answer, in tokens."})
    generation: bool = field(
        default=True, metadata={"help": "Score each training task by generation on its test split."}
    )
    harness: list[HarnessScore] = field(
        default_factory=list, metadata={"help": "lm-evaluation-harness scores (extra lm-eval)."}
    )
    harness_limit: int | None = field(default=None, metadata={"help": "Harness examples per task."})
    harness_batch_size: int = field(default=8, metadata={"help": "Harness batch size."})
    harness_include: str | None = field(
        default=None, metadata={"help": "A folder of custom harness task YAMLs (e.g. over local files)."}
    )

    def __post_init__(self) -> None:
        if not self.generation and not self.harness:
            raise ValueError("generation: with generation off, list harness scores to evaluate.")
        for name in ("batch_size", "max_new_tokens", "harness_batch_size", "limit", "harness_limit"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name}: must be >= 1, got {value}.")


BASELINES = ["task_arithmetic", "ties", "dare_ties", "consensus_ta"]


@dataclass
class CompareSpec:
    """What ``metis-hf compare`` runs: post-hoc merges of the experts and many-shot runs."""

    seeds: list[int] = field(default_factory=lambda: [0], metadata={"help": "Training seeds; paired."})
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
    metric: str = field(
        default="exact_match", metadata={"help": "Score normalized in the tables: exact_match or score."}
    )
    task_weights: dict[str, float] = field(
        default_factory=dict, metadata={"help": "Task -> weight in Avg (default 1 each)."}
    )

    def __post_init__(self) -> None:
        from metis_hf.merging import available_methods

        known = available_methods()
        for name, variant in self.variants.items():
            if name in known:
                raise ValueError(f"variants: {name!r} is a registered method; give the variant another name.")
            if not re.fullmatch(r"[A-Za-z0-9_.@=+-]+", name):
                raise ValueError(
                    f"variants: {name!r} names a run folder: use letters, digits and _ . @ = + -."
                )
            if not isinstance(variant, dict) or variant.get("method") not in known:
                raise ValueError(
                    f"variants.{name}: needs 'method', one of {', '.join(known)}; got {variant!r}."
                )
            if not isinstance(variant.get("training", {}), dict):
                raise ValueError(f"variants.{name}.training: must be a mapping of MetisConfig fields.")
        for key in ("post_hoc_methods", "many_shot_methods"):
            for method in getattr(self, key):
                if method not in known and method not in self.variants:
                    raise ValueError(
                        f"{key}: unknown merge method {method!r} (known: {', '.join(known)}; "
                        f"variants: {', '.join(self.variants) or 'none'})."
                    )
        for method in self.method_params:
            if method not in known:
                raise ValueError(f"method_params: unknown merge method {method!r}.")
        if self.metric not in ("exact_match", "score"):
            raise ValueError(f"metric must be 'exact_match' or 'score', got {self.metric!r}.")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be a non-empty list of distinct integers, got {self.seeds!r}.")
        if not self.post_hoc_methods and not self.many_shot_methods:
            raise ValueError("compare needs at least one post-hoc or many-shot method.")

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


@dataclass
class Recipe:
    model: str = field(default=DEFAULT_MODEL, metadata={"help": "Built-in name, Hub id or local path."})
    seed: int = field(default=0, metadata={"help": "Seed for training and sampling."})
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

    def __post_init__(self) -> None:
        if not self.tasks:
            raise ValueError("tasks: a recipe needs at least one task.")
        names = [t.name for t in self.tasks]
        for score in self.evaluation.harness:
            if score.expert is not None and score.expert not in names:
                raise ValueError(
                    f"evaluation.harness: expert {score.expert!r} of {score.name!r} is not a task."
                )
        scored = names + [score.name for score in self.evaluation.harness]
        for task in self.compare.task_weights:
            if task not in scored:
                raise ValueError(
                    f"compare.task_weights: {task!r} is not a task or harness score of this recipe."
                )


_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


class RecipeError(ValueError):
    """A recipe that does not validate; the message starts with the offending key's path."""


def check_type(value: Any, annotation: Any, path: str) -> Any:
    """``value`` checked against a type annotation (ints widen to float, numeric strings such as
    ``1e-4`` become floats); a mismatch raises :class:`RecipeError` naming ``path``."""
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(annotation):
            try:
                return check_type(value, option, path)
            except RecipeError:
                continue
        raise RecipeError(f"{path}: {value!r} does not match {annotation}")
    if annotation is type(None):
        if value is not None:
            raise RecipeError(f"{path}: expected null, got {value!r}")
        return value
    if dataclasses.is_dataclass(annotation):
        return from_dict(annotation, value, path)
    if origin is list:
        if not isinstance(value, list):
            raise RecipeError(f"{path}: expected a list, got {type(value).__name__}")
        (item_type,) = typing.get_args(annotation) or (Any,)
        return [check_type(v, item_type, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{path}: expected a mapping, got {type(value).__name__}")
        _, value_type = typing.get_args(annotation) or (Any, Any)
        return {k: check_type(v, value_type, f"{path}.{k}") for k, v in value.items()}
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is float and isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        return float(value)  # PyYAML (YAML 1.1) reads 1e-4, without a dot, as a string
    if annotation in (int, float) and isinstance(value, bool):
        raise RecipeError(f"{path}: expected {annotation.__name__}, got a boolean")
    if isinstance(annotation, type) and not isinstance(value, annotation):
        raise RecipeError(f"{path}: expected {annotation.__name__}, got {type(value).__name__} ({value!r})")
    return value


def from_dict(cls: type, data: Any, path: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, checking every key and type."""
    where = path or "recipe"
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        raise RecipeError(
            f"{path + '.' if path else ''}{unknown[0]}: unknown key (allowed: {', '.join(sorted(names))})"
        )
    kwargs = {k: check_type(v, hints[k], f"{path + '.' if path else ''}{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        if isinstance(err, RecipeError):
            raise
        message = str(err)
        field_name = message.split(":", 1)[0]
        if path and field_name in names:  # "seeds: ..." from __post_init__ -> "compare.seeds: ..."
            raise RecipeError(f"{path}.{message}") from err
        raise RecipeError(f"{where}: {message}") from err


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
    """The embedded offline default (the same file as recipes/offline/cpu-4tasks.yaml)."""
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
    return from_dict(Recipe, load_recipe_dict(path, overrides))


# --- from a recipe to the configs it describes ------------------------------------------------


def metis_config_from_recipe(recipe: Recipe, output_dir: str | os.PathLike, **extra: Any):
    from metis_hf.training import MetisConfig

    training = typed_fields(MetisConfig, {**recipe.training, **extra}, "training")
    values = {"seed": recipe.seed, "disable_tqdm": False, "logging_steps": 10, **training}
    try:
        return MetisConfig(output_dir=str(output_dir), **values)
    except (TypeError, ValueError) as err:
        raise RecipeError(f"training: {err}") from err


def lora_config_from_recipe(recipe: Recipe):
    from peft import LoraConfig

    from metis_hf.training.trainer import default_lora_config

    allowed = {f.name for f in dataclasses.fields(LoraConfig) if f.init}
    values = {**default_lora_config().to_dict(), **typed_fields(LoraConfig, recipe.lora, "lora")}
    try:
        return LoraConfig(**{k: v for k, v in values.items() if k in allowed})
    except (TypeError, ValueError) as err:
        raise RecipeError(f"lora: {err}") from err


def typed_fields(cls: type, values: dict[str, Any], section: str) -> dict[str, Any]:
    """A recipe section's values checked against the fields of dataclass ``cls`` (``1e-4`` read as a
    float); an unknown field or a wrong type names its key path."""
    hints = typing.get_type_hints(cls)
    allowed = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(values) - allowed)
    if unknown:
        raise RecipeError(f"{section}.{unknown[0]}: unknown {cls.__name__} field")
    checked = {}
    for key, value in values.items():
        if typing.get_origin(hints[key]) is list and not isinstance(value, list):
            value = [value]  # one value for a list field is a list of one, as on the command line
        checked[key] = check_type(value, hints[key], f"{section}.{key}")
    return checked


def recipe_text(recipe_path: str | os.PathLike | None, overrides: list[str] | None = None) -> str:
    """The recipe file verbatim, with the command line's overrides appended as comments."""
    text = Path(recipe_path or default_recipe_path()).read_text().rstrip()
    return text + "".join(f"\n# --set {o}" for o in overrides or [])


def recipe_datasets(recipe: Recipe) -> list[str]:
    """The Hub datasets a recipe trains on (for a card's front matter)."""
    return sorted({t.dataset for t in recipe.tasks if t.source == "hub" and t.dataset})
