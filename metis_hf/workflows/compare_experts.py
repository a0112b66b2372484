"""Experts trained before a compare (``compare.experts``): found, checked against the recipe before
any work, and copied to where the grid's post-hoc merges read them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from metis_hf.files import replace_dir
from metis_hf.recipe import Recipe, RecipeError, lora_config_from_recipe

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def expert_sources(recipe: Recipe, task_names: list[str], experts_folder: str) -> dict[str, Path] | None:
    """Adapter folders of experts trained before, per task (None: the grid trains them).
    ``experts_folder``: where an earlier compare of this seed kept its experts' adapters."""
    given = recipe.compare.experts
    if given is None:
        return None
    if isinstance(given, str):
        root = Path(given) / "runs" / experts_folder / "adapter" / "task_adapters"
        sources = {t: root / t for t in task_names}
    else:
        unknown, missing = sorted(set(given) - set(task_names)), sorted(set(task_names) - set(given))
        if unknown or missing:
            raise RecipeError(
                f"compare.experts: tasks {unknown or missing} are {'not in the recipe' if unknown else 'missing'}."
            )
        sources = {t: Path(given[t]) for t in task_names}
    for task, source in sources.items():
        for name in ADAPTER_FILES:
            if not (source / name).is_file():
                raise RecipeError(f"compare.experts: {task}: no {name} in {source} (a PEFT adapter folder).")
        try:
            check_expert(recipe, source)
        except ValueError as err:
            raise RecipeError(f"compare.experts: {task}: {source}: {err}") from err
    return sources


def check_expert(recipe: Recipe, source: Path) -> None:
    """An expert fits the recipe's model and LoRA settings, with finite weights: checked before
    any work, rather than by PEFT or the merge after the base model is scored."""
    from safetensors import safe_open

    from metis_hf.workflows.plan import model_shape

    config = json.loads((source / "adapter_config.json").read_text())
    lora = lora_config_from_recipe(recipe)

    def targets(value: Any) -> list[str]:  # a list, or one name or regex
        return sorted([value] if isinstance(value, str) else value or [])

    wanted = {"r": lora.r, "target_modules": targets(lora.target_modules)}
    found = {"r": config.get("r"), "target_modules": targets(config.get("target_modules"))}
    for key in wanted:
        if wanted[key] != found[key]:
            raise ValueError(f"{key} is {found[key]}, the recipe's lora has {wanted[key]}")
    modules = model_shape(recipe.model).module_shapes()
    with safe_open(str(source / "adapter_model.safetensors"), "pt") as handle:
        for key in handle.keys():
            tensor = handle.get_tensor(key)
            module = next((m for m in modules if f".{m}." in key), None)
            if module is not None and key.endswith(".weight") and tensor.dim() == 2:
                fan_in, fan_out = modules[module]
                expected = (lora.r, fan_in) if ".lora_A." in key else (fan_out, lora.r)
                if tuple(tensor.shape) != expected:
                    raise ValueError(
                        f"tensor {key!r} has shape {tuple(tensor.shape)}, where the recipe's model "
                        f"({recipe.model}) and lora give {expected}: trained on another model?"
                    )
            if not torch.isfinite(tensor).all():
                raise ValueError(f"tensor {key!r} holds NaN or infinite values")


def copy_experts(sources: dict[str, Path], adapters: Path) -> None:
    """Each task's adapter files into ``adapters/<task>``, each folder complete or absent."""
    for task, source in sources.items():
        tmp = adapters / f".{task}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for name in ADAPTER_FILES:
            shutil.copy2(source / name, tmp / name)
        replace_dir(tmp, adapters / task)
