"""A recipe trained with MetisTrainer, then the base and merged models scored (``metis-hf train``,
``metis-hf demo``)."""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from metis_hf.data import Task, build_tasks
from metis_hf.evaluation import TaskScore, format_score_table, score_tasks
from metis_hf.evaluation.suite import card_results
from metis_hf.files import replace_dir, write_json
from metis_hf.hub import card_info_for, write_card
from metis_hf.models import load_model_and_tokenizer
from metis_hf.recipe import (
    Recipe,
    RecipeError,
    load_recipe,
    lora_config_from_recipe,
    metis_config_from_recipe,
    recipe_datasets,
    recipe_text,
)


def _scores(model, tokenizer, tasks, recipe: Recipe) -> dict[str, TaskScore]:
    ev = recipe.evaluation
    return score_tasks(
        model,
        tokenizer,
        tasks,
        split=ev.split,
        limit=ev.limit,
        batch_size=ev.batch_size,
        max_new_tokens=ev.max_new_tokens,
    )


def trainer_from_recipe(
    recipe: Recipe,
    args,
    tasks: Mapping[str, Task],
    model=None,
    tokenizer=None,
    callbacks: list | None = None,
):
    """A MetisTrainer on the recipe's model (loaded unless given, with its tokenizer) and LoRA
    settings, training on each task's train split with its validation split."""
    if model is None:
        model, tokenizer = load_model_and_tokenizer(recipe.model)
    return trainer_for_tasks(model, tokenizer, args, tasks, lora_config_from_recipe(recipe), callbacks)


def trainer_for_tasks(model, tokenizer, args, tasks: Mapping[str, Task], peft_config=None, callbacks=None):
    """A MetisTrainer training on each task's train split with its validation split (LoRA: the
    trainer's default unless ``peft_config``)."""
    from metis_hf.training import MetisTrainer

    return MetisTrainer(
        model=model,
        args=args,
        train_dataset={name: task.train for name, task in tasks.items()},
        eval_dataset={name: task.validation for name, task in tasks.items()},
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=callbacks,
    )


def get_last_checkpoint_in(folder: Path) -> str | None:
    """The latest ``checkpoint-N`` folder in ``folder``, if any."""
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(folder)) if folder.is_dir() else None


def run_training(
    recipe_path: str | None,
    output_dir: str | os.PathLike,
    overrides: list[str] | None = None,
    evaluate: bool = True,
    overwrite: bool = False,
    resume: str | bool | None = None,
) -> dict[str, Any]:
    """Train a recipe, save the merged adapter to ``output_dir/merged``, and (by default) score the
    base and the merged model on every task's test split. Returns (and writes) ``results.json``.
    An earlier run's outputs in ``output_dir`` are replaced only with ``overwrite``, once the new
    merged adapter is complete. ``resume``: continue an interrupted run from a checkpoint folder,
    or (True) from the latest checkpoint in ``output_dir``; the recipe's
    ``training.resume_from_checkpoint`` does the same."""
    from metis_hf.training.round_merge import ROUNDS_FILE
    from metis_hf.training.rounds import check_merge_settings

    recipe = load_recipe(recipe_path, overrides)
    output_dir = Path(output_dir)
    args = metis_config_from_recipe(recipe, output_dir)
    in_recipe = args.resume_from_checkpoint
    if resume and in_recipe and (resume is True or Path(resume).resolve() != Path(in_recipe).resolve()):
        raise RecipeError(
            f"training.resume_from_checkpoint: {in_recipe!r} and --resume {resume!r} disagree; give one."
        )
    resume = resume or in_recipe
    if resume is True:
        resume = get_last_checkpoint_in(output_dir)
        if resume is None:
            raise FileNotFoundError(f"--resume: no checkpoint-N folder in {output_dir} to resume from.")
    elif resume and not Path(resume).is_dir():
        raise FileNotFoundError(f"resume: checkpoint folder {str(resume)!r} does not exist.")
    earlier = [n for n in ("merged", "results.json", ROUNDS_FILE) if (output_dir / n).exists()]
    if earlier and not overwrite and not resume:
        checkpoints = (
            " or --resume to continue from its latest checkpoint"
            if get_last_checkpoint_in(output_dir)
            else ""
        )
        raise FileExistsError(
            f"{output_dir} holds an earlier run ({', '.join(earlier)}); pass --overwrite to replace it"
            f"{checkpoints}, or choose another --output-dir."
        )
    lora = lora_config_from_recipe(recipe)
    try:
        check_merge_settings(args, [t.name for t in recipe.tasks])
    except ValueError as err:
        raise RecipeError(f"training: {err}") from err
    start = time.time()
    print(
        f"[metis-hf] model {recipe.model}; tasks {[t.name for t in recipe.tasks]}; "
        f"{args.protocol} {args.merge_method}, {args.num_rounds} rounds"
    )
    tasks = build_tasks(recipe.tasks)
    model, tokenizer = load_model_and_tokenizer(recipe.model)
    results: dict[str, Any] = {
        "recipe": recipe_path or "embedded offline default",
        "overrides": overrides or [],
    }
    tables: dict[str, dict[str, TaskScore]] = {}
    if evaluate:
        tables["base"] = _scores(model, tokenizer, tasks, recipe)
        print(format_score_table(tables))
    trainer = trainer_for_tasks(model, tokenizer, args, tasks, lora)
    trained_at = time.time()
    if resume:
        print(f"[metis-hf] resuming from {resume}")
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    results["train_seconds"] = time.time() - trained_at
    staged = tempfile.mkdtemp(prefix=".merged-", dir=output_dir)
    try:
        trainer.save_model(staged)
        replace_dir(staged, output_dir / "merged")
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    results["rounds"] = trainer.round_records
    if evaluate:
        tables["merged"] = _scores(trainer.peft_model, tokenizer, tasks, recipe)
        results["scores"] = {
            m: {t: dataclasses.asdict(s) for t, s in table.items()} for m, table in tables.items()
        }
        print(format_score_table(tables))
    results["total_seconds"] = time.time() - start
    write_json(output_dir / "results.json", results)
    write_card(
        output_dir / "merged",
        card_info_for(
            "adapter",
            args.merge_method,
            args.protocol,
            recipe.model,
            datasets=recipe_datasets(recipe),
            tasks=list(tasks),
            config_text=recipe_text(recipe_path, overrides),
            rounds=trainer.round_records,
            evaluation_table=format_score_table(tables) if tables else None,
            results=card_results(tables["merged"], recipe.tasks, recipe.evaluation.split) if evaluate else [],
        ),
    )
    print(
        f"[metis-hf] done in {results['total_seconds']:.0f} s; merged adapter in {output_dir / 'merged'}; "
        f"results in {output_dir / 'results.json'}"
    )
    return results
