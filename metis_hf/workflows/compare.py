"""``metis-hf compare RECIPE.yaml``: every selected method post hoc and many-shot, evaluated side by side.

For each seed: the individual experts are trained once (the post-hoc protocol: each task alone,
for the same optimizer steps per task as a many-shot run), merged once by every post-hoc method,
and every many-shot method trains its own run; the joint-training reference trains one adapter on
all tasks' data mixed. Every model is scored on every task; the experts give the per-task
normalization. Output folder::

    runs/base/result.json                         the base model's scores and validation losses
    runs/seed<S>/experts/                         task adapters + each expert's score on its task
    runs/seed<S>/multitask/adapter/               multi-task SFT: one adapter on the mixed data
    runs/seed<S>/post_hoc-<method>/adapter/       a merged adapter (PEFT, safetensors)
    runs/seed<S>/many_shot-<method>/adapter/      the same, plus rounds.jsonl
    runs/seed<S>/branch_point-<digest>/           round 1 trained once for the many-shot runs that
                                                  train alike; each resumes there (removed at the end)
    results.json, results.md, radar_post_hoc.png, radar_many_shot.png, round_curves.png

A run whose ``result.json`` exists is read back, not recomputed: an interrupted compare resumes, and
methods or seeds added to the recipe compute only their own runs. A run that trains keeps its latest
checkpoint (every ``compare.checkpoint_steps`` optimizer steps) in its ``trainer/`` folder, so the run
interrupted mid-training resumes from there, to the same adapters. Each result records the recipe
settings it depends on; a folder whose results were computed under other settings is refused,
with the differences named, rather than mixed into the tables.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter

from metis_hf.data import Task, build_tasks
from metis_hf.evaluation.report import multitask_loss, run_losses
from metis_hf.evaluation.suite import load_for_evaluation
from metis_hf.files import write_json
from metis_hf.hub import card_info_for, check_repo_id, write_card
from metis_hf.merging import get_merge_method
from metis_hf.merging.scale_search import AUTO, search_scale, searched_scale
from metis_hf.merging.task_vectors import lora_config_at_rank, lora_scaling, merge_lora_states
from metis_hf.models import load_model_and_tokenizer, load_tokenizer
from metis_hf.recipe import (
    Recipe,
    RecipeError,
    compare_merge_spec,
    load_recipe,
    metis_config_from_recipe,
    recipe_datasets,
    recipe_text,
)
from metis_hf.workflows.compare_experts import copy_experts, expert_sources
from metis_hf.workflows.compare_scoring import Scorer
from metis_hf.workflows.compare_training import RESULT_FILE, Run, RunTraining
from metis_hf.workflows.merge import write_adapter

logger = logging.getLogger(__name__)

MIXED_TASK = "all_tasks_mixed"  # the one task of the multi-task SFT run


def plan_runs(recipe: Recipe) -> list[Run]:
    spec = recipe.compare
    runs = [Run("base")]
    for seed in spec.seeds:
        if spec.post_hoc_methods or spec.many_shot_methods:
            runs.append(Run("experts", seed))
        if spec.multitask_sft:
            runs.append(Run("multitask", seed))
        runs += [Run("post_hoc", seed, m) for m in spec.post_hoc_methods]
        runs += [Run("many_shot", seed, m) for m in spec.many_shot_methods]
    return runs


class Comparison:
    """Runs (or reads back) every run of a compare grid under ``output_dir/runs``."""

    def __init__(self, recipe: Recipe, output_dir: str | os.PathLike) -> None:
        self.recipe = recipe
        self.output_dir = Path(output_dir)
        self.tasks = build_tasks(recipe.tasks)
        self.task_names = list(self.tasks)
        self.training = RunTraining(recipe, self.tasks, self.output_dir)
        args = self.training.args(self.output_dir, Run("base"))
        self._check_validation_scores_tokens(args)
        # A bad training override or many-shot merge setting fails now, not hours in.
        for name in dict.fromkeys([*recipe.compare.variants, *recipe.compare.many_shot_methods]):
            kind = "many_shot" if name in recipe.compare.many_shot_methods else "post_hoc"
            try:
                self.training.args(self.output_dir, Run(kind, recipe.seed, name))
            except RecipeError as err:
                where = f"compare.variants.{name}" if name in recipe.compare.variants else f"compare: {name}"
                raise RecipeError(f"{where}: {err}") from err
        self.scorer = Scorer(
            recipe,
            self.tasks,
            dict(
                loss_batch_size=args.gap_batch_size or args.per_device_train_batch_size,
                max_length=args.max_length or 512,
                completion_only_loss=bool(args.completion_only_loss),
            ),
        )
        for seed in recipe.compare.seeds:  # experts given: every folder checked before any work
            self.expert_sources(seed)
        for name in recipe.compare.post_hoc_methods:  # many-shot ones: checked by their config above
            spec = compare_merge_spec(recipe, name)
            method, params = spec.method, dict(spec.params)
            searched = searched_scale(params)
            if searched and (searched != "scale" or "scale" not in get_merge_method(method).parameters):
                raise RecipeError(
                    f"compare: {name}: post hoc searches `scale`, which {method} does not take."
                )

    def _check_validation_scores_tokens(self, args) -> None:
        """Every task's validation set keeps a scored token within max_length, as training
        requires: else every validation loss is 0 and a scale search or a loss gap means nothing."""
        from metis_hf.training.trainer import gaps_on_completion, scored_examples

        tokenizer = load_tokenizer(self.recipe.model)
        for name, task in self.tasks.items():
            try:
                scored_examples(
                    tokenizer,
                    task.validation,
                    f"task {name!r} validation",
                    gaps_on_completion(args),
                    args.max_length,
                )
            except ValueError as err:
                raise RecipeError(f"tasks: {err}") from err

    def expert_sources(self, seed: int) -> dict[str, Path] | None:
        """Adapter folders of experts trained before, per task (None: train them here)."""
        return expert_sources(self.recipe, self.task_names, Run("experts", seed).folder)

    def _result(self, run: Run) -> dict[str, Any]:
        return json.loads((self.output_dir / "runs" / run.folder / RESULT_FILE).read_text())

    def _experts_dir(self, seed: int) -> Path:
        return self.output_dir / "runs" / Run("experts", seed).folder / "adapter" / "task_adapters"

    # --- the kinds of run ---------------------------------------------------------------------

    def run_base(self, run: Run, folder: Path) -> dict[str, Any]:
        model, tokenizer = load_model_and_tokenizer(self.recipe.model)
        return self.scorer.evaluate(model, tokenizer)

    def run_experts(self, run: Run, folder: Path) -> dict[str, Any]:
        """Each task's expert (trained here, or copied from ``compare.experts``), each scored on
        its own task: the per-task normalization."""
        from peft import PeftModel

        result: dict[str, Any] = {"scores": {}, "losses": {}, "answer_losses": {}}
        sources = self.expert_sources(run.seed)
        if sources is None:
            args = self.training.args(folder, run, protocol="post_hoc", save_task_adapters=True)
            trainer, record = self.training.train(folder, args, self.settings(run))
            result.update(**record, optimizer_steps=trainer.state.global_step)
            model, tokenizer = trainer.peft_model, trainer.processing_class
        else:
            copy_experts(sources, self._experts_dir(run.seed))
            model, tokenizer = load_model_and_tokenizer(self.recipe.model)
            result["experts_from"] = {t: str(sources[t]) for t in self.task_names}
        for task in self.task_names:
            if sources is None:
                model.set_adapter(task)
            else:
                model = PeftModel.from_pretrained(
                    model, str(self._experts_dir(run.seed) / task), adapter_name=task
                )
            own = self.scorer.evaluate(model, tokenizer, [task])
            for field in ("scores", "losses", "answer_losses"):
                result[field].update(own[field])
            if sources is not None:
                model = model.unload()  # the base again, for the next task's adapter
        return result

    def run_multitask(self, run: Run, folder: Path) -> dict[str, Any]:
        """Multi-task SFT, the joint-training reference: one adapter trained on every task's
        training data mixed (shuffled with the run's seed), for as many optimizer steps as all the
        experts together, then scored on every task."""
        from datasets import concatenate_datasets

        def mixed(split: str):
            return concatenate_datasets([getattr(task, split) for task in self.tasks.values()])

        # All the experts' steps together; counted in epochs instead, the mix is already T times longer.
        local_steps = self.training.args(folder, run).local_steps
        args = metis_config_from_recipe(
            self.recipe,
            folder / "trainer",
            seed=run.seed,
            protocol="post_hoc",
            merge_method="task_arithmetic",
            merge_params={"scale": 1.0},  # the merge of one adapter is that adapter
            local_steps=local_steps * len(self.tasks) if local_steps else None,
            **self.training.checkpointing(),
        )
        task = Task(MIXED_TASK, mixed("train").shuffle(seed=run.seed), mixed("validation"), mixed("test"))
        trainer, record = self.training.train(folder, args, self.settings(run), {MIXED_TASK: task})
        trainer.peft_model.set_adapter("default")
        return {
            **self.scorer.evaluate(trainer.peft_model, trainer.processing_class),
            **record,
            "optimizer_steps": trainer.state.global_step,
        }

    def run_post_hoc(self, run: Run, folder: Path) -> dict[str, Any]:
        """The seed's experts merged once, at a scale searched on the validation loss where the
        method's scale is ``auto``."""
        from safetensors.torch import load_file

        from metis_hf.training.rounds import merge_parameters

        experts_dir = self._experts_dir(run.seed)
        states = [load_file(experts_dir / t / "adapter_model.safetensors") for t in self.task_names]
        base = run_losses(self._result(Run("base")))
        experts = run_losses(self._result(Run("experts", run.seed)))
        # G_0 is the base model: a post-hoc METIS gap is the base's loss minus the expert's.
        gaps = {t: base[t] - experts[t] for t in self.task_names}
        args = self.training.args(folder, run)
        method = args.merge_method  # a variant's registered method
        sizes = {t: len(self.tasks[t].train) for t in self.task_names}
        params, weights = merge_parameters(args, method, self.task_names, 0, gaps, base, sizes, base)
        expert_config = json.loads((experts_dir / self.task_names[0] / "adapter_config.json").read_text())
        scaling = lora_scaling(
            expert_config["r"], expert_config["lora_alpha"], expert_config.get("use_rslora", False)
        )
        # the core space merges T rank-r adapters exactly: rank T * r
        rank = expert_config["r"] * (len(states) if args.merge_space == "core" else 1)

        def merged_adapter(params: dict[str, Any], where: Path) -> float | None:
            merged, truncation = merge_lora_states(
                method, states, args.merge_space, rank, scaling, names=self.task_names, **params
            )
            tmp = where.with_name(where.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            write_adapter(tmp, merged, lora_config_at_rank(expert_config, rank))
            shutil.rmtree(where, ignore_errors=True)
            os.replace(tmp, where)
            return truncation

        search = None
        if compare_merge_spec(self.recipe, run.method).params.get("scale") == AUTO:

            def validation_loss(scale: float) -> float:  # the mean over tasks, of the merge at scale
                merged_adapter({**params, "scale": scale}, folder / "candidate")
                model, tokenizer = load_for_evaluation(folder / "candidate", tokenizer=self.recipe.model)
                return multitask_loss(self.scorer.evaluate(model, tokenizer, losses_only=True))

            params["scale"], search = search_scale(validation_loss)
            shutil.rmtree(folder / "candidate", ignore_errors=True)
            weights = get_merge_method(method).weights_of(params, len(states))
        truncation = merged_adapter(params, folder / "adapter")
        model, tokenizer = load_for_evaluation(folder / "adapter", tokenizer=self.recipe.model)
        result = {
            **self.scorer.evaluate(model, tokenizer),
            "weights": dict(zip(self.task_names, weights)),
            "loss_gaps": gaps if get_merge_method(method).uses_loss_gaps else None,
            "truncation_error": truncation,
        }
        if search is not None:
            result["scale_search"] = {"chosen": params["scale"], "validation_loss": search}
        return result

    def run_many_shot(self, run: Run, folder: Path) -> dict[str, Any]:
        settings = self.settings(run)
        branch = self.training.branch_point(run, settings)
        args = self.training.args(folder, run, protocol="many_shot", save_task_adapters=False)
        trainer, record = self.training.train(folder, args, settings, resume_from=branch and branch[0])
        trainer.peft_model.set_adapter("default")
        result = {
            **self.scorer.evaluate(trainer.peft_model, trainer.processing_class),
            "rounds": trainer.round_records,
            **record,
        }
        if branch is not None:  # round 1's training is shared: counted once, in branch_seconds
            result["branch_seconds"] = branch[1]
        return result

    # --- driver -------------------------------------------------------------------------------

    def settings(self, run: Run) -> dict[str, Any]:
        """What the recipe sets that ``run``'s result depends on (as written: defaults left out, so
        that a new default in a later metis-hf does not disown earlier results)."""
        data = TypeAdapter(Recipe).dump_python(self.recipe, mode="json", exclude_defaults=True)
        sections = ["model", "tasks", "evaluation"] if run.kind == "base" else [*_TRAINED_SECTIONS]
        settings = {key: data.get(key) for key in sections}
        if run.kind in ("experts", "post_hoc"):
            settings["experts"] = data.get("compare", {}).get("experts")
        if run.method is not None:
            spec = compare_merge_spec(self.recipe, run.method)
            settings["method"] = {
                "name": spec.method,
                "params": dict(spec.params),
                "training": self.recipe.compare.training_overrides(run.method),
            }
        return json.loads(json.dumps(settings))  # as it reads back from result.json

    def _experts_to_rebuild(self, run: Run) -> bool:
        """Whether a finished experts run must run again: its adapters are gone (a folder kept
        with its results only) and a post-hoc run of its seed has yet to merge them."""
        if run.kind != "experts":
            return False
        adapters = self._experts_dir(run.seed)
        if all((adapters / t / "adapter_model.safetensors").is_file() for t in self.task_names):
            return False
        pending = [Run("post_hoc", run.seed, m) for m in self.recipe.compare.post_hoc_methods]
        return any(not (self.output_dir / "runs" / p.folder / RESULT_FILE).is_file() for p in pending)

    def run(self, run: Run, index: int, total: int) -> dict[str, Any]:
        folder = self.output_dir / "runs" / run.folder
        result_path = folder / RESULT_FILE
        settings = self.settings(run)
        if result_path.is_file():
            result = json.loads(result_path.read_text())
            recorded = result.get("settings")  # None: written before metis-hf recorded them
            if recorded is not None and recorded != settings:
                raise RecipeError(
                    f"{folder} holds a result computed with other settings ("
                    + "; ".join(_differences(recorded, settings)[:3])
                    + "): give compare another --output-dir, or delete that folder to recompute it."
                )
            if not self._experts_to_rebuild(run):
                print(f"[metis-hf compare] run {index}/{total}: {run.label}: done before, reading it back")
                return result
            print(f"[metis-hf compare] {run.label}: adapters missing and post-hoc runs need them: again")
        print(f"[metis-hf compare] run {index}/{total}: {run.label}", flush=True)
        folder.mkdir(parents=True, exist_ok=True)
        start = time.time()
        result = getattr(self, f"run_{run.kind}")(run, folder)
        result.update(kind=run.kind, seed=run.seed, method=run.method, seconds=time.time() - start)
        result.update(settings=settings, versions=_versions())
        shutil.rmtree(folder / "trainer", ignore_errors=True)  # checkpoints of a finished run
        write_json(result_path, result)
        if run.kind == "many_shot":
            self.training.drop_branch_point(run)
        print(f"[metis-hf compare] run {index}/{total} finished in {result['seconds']:.0f} s", flush=True)
        return result


_TRAINED_SECTIONS = ("model", "tasks", "evaluation", "lora", "training")
_VERSIONED = ("metis-hf", "torch", "transformers", "peft", "trl", "reasoning-gym")


def _versions() -> dict[str, str]:
    """The installed versions a run's numbers may depend on (recorded, not checked)."""
    found = {}
    for package in _VERSIONED:
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def _differences(recorded: Any, current: Any, path: str = "") -> list[str]:
    """Dotted paths where two settings trees differ, with both values."""
    if isinstance(recorded, dict) and isinstance(current, dict):
        found = []
        for key in sorted(set(recorded) | set(current), key=str):
            where = f"{path}.{key}" if path else str(key)
            found += _differences(recorded.get(key), current.get(key), where)
        return found
    if isinstance(recorded, list) and isinstance(current, list) and len(recorded) == len(current):
        return [
            d for i, (a, b) in enumerate(zip(recorded, current)) for d in _differences(a, b, f"{path}.{i}")
        ]
    return [] if recorded == current else [f"{path}: {json.dumps(recorded)} then, {json.dumps(current)} now"]


def run_compare(
    recipe_path: str | os.PathLike | None,
    output_dir: str | os.PathLike,
    overrides: list[str] | None = None,
    plots: bool = True,
    push_to_hub: str | None = None,
) -> dict[str, Any]:
    """Run (or resume) the compare grid of a recipe and write results.json, results.md, plots and a
    report card (README.md); with ``push_to_hub``, push the report to that repository."""
    from metis_hf.evaluation.report import build_report, write_report

    recipe = load_recipe(recipe_path, overrides)
    if push_to_hub:
        check_repo_id(push_to_hub)  # before hours of training, not after
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    comparison = Comparison(recipe, output_dir)
    runs = plan_runs(recipe)
    print(
        f"[metis-hf compare] {len(runs)} runs: tasks {comparison.task_names}, seeds {recipe.compare.seeds}, "
        f"post-hoc {recipe.compare.post_hoc_methods}, many-shot {recipe.compare.many_shot_methods}"
    )
    results = [comparison.run(run, i, len(runs)) for i, run in enumerate(runs, 1)]
    report = build_report(
        results, comparison.scorer.score_names, recipe.compare, comparison.scorer.most_common_answers()
    )
    report["recipe"] = str(recipe_path) if recipe_path else "embedded offline default"
    report["overrides"] = list(overrides or [])
    written = write_report(report, output_dir, plots=plots)
    info = card_info_for(
        "comparison",
        "metis",
        "compare",
        recipe.model,
        datasets=recipe_datasets(recipe),
        tasks=comparison.scorer.score_names,
        config_text=recipe_text(recipe_path, overrides),
        evaluation_table=report["markdown"],
        images=[p.name for p in written if p.suffix == ".png"],
    )
    write_card(output_dir, info)
    print(report["markdown"])
    print(f"[metis-hf compare] results in {output_dir}")
    if push_to_hub:
        from metis_hf.hub import describe_push, push_folder

        print(
            describe_push(
                push_folder(output_dir, push_to_hub, commit_message="metis-hf compare report"), output_dir
            )
        )
    return report
