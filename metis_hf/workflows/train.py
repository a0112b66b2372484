"""A recipe trained with MetisTrainer, then the base and merged models scored (``metis-hf train``,
``metis-hf demo``)."""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from metis_hf.data import build_tasks
from metis_hf.evaluation import TaskScore, format_score_table, score_tasks
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


def run_training(
    recipe_path: str | None,
    output_dir: str | os.PathLike,
    overrides: list[str] | None = None,
    evaluate: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Train a recipe, save the merged adapter to ``output_dir/merged``, and (by default) score the
    base and the merged model on every task's test split. Returns (and writes) ``results.json``.
    An earlier run's outputs in ``output_dir`` are replaced only with ``overwrite``, once the new
    merged adapter is complete."""
    from metis_hf.training import MetisTrainer
    from metis_hf.training.rounds import check_merge_settings
    from metis_hf.training.trainer import ROUNDS_FILE

    recipe = load_recipe(recipe_path, overrides)
    output_dir = Path(output_dir)
    earlier = [n for n in ("merged", "results.json", ROUNDS_FILE) if (output_dir / n).exists()]
    if earlier and not overwrite:
        raise FileExistsError(
            f"{output_dir} holds an earlier run ({', '.join(earlier)}); pass --overwrite to replace it "
            "or choose another --output-dir."
        )
    args = metis_config_from_recipe(recipe, output_dir)
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
    trainer = MetisTrainer(
        model=model,
        args=args,
        train_dataset={name: t.train for name, t in tasks.items()},
        eval_dataset={name: t.validation for name, t in tasks.items()},
        processing_class=tokenizer,
        peft_config=lora,
    )
    trained_at = time.time()
    trainer.train()
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
        ),
    )
    print(
        f"[metis-hf] done in {results['total_seconds']:.0f} s; merged adapter in {output_dir / 'merged'}; "
        f"results in {output_dir / 'results.json'}"
    )
    return results
