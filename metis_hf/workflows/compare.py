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

import dataclasses
import hashlib
import importlib.metadata
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import TypeAdapter

from metis_hf.data import build_tasks
from metis_hf.evaluation.generation import most_common_answers
from metis_hf.evaluation.report import multitask_loss, run_losses
from metis_hf.evaluation.retention import ensure_bigbench, load_multiple_choice, multiple_choice_accuracy
from metis_hf.evaluation.suite import evaluate_model, load_for_evaluation
from metis_hf.files import replace_dir, write_json
from metis_hf.hub import card_info_for, check_repo_id, write_card
from metis_hf.merging import get_merge_method
from metis_hf.merging.scale_search import AUTO, search_scale, searched_scale
from metis_hf.models import load_model_and_tokenizer, load_tokenizer
from metis_hf.recipe import (
    Recipe,
    RecipeError,
    compare_drops_training_params,
    load_recipe,
    lora_config_from_recipe,
    metis_config_from_recipe,
    recipe_datasets,
    recipe_text,
)

logger = logging.getLogger(__name__)

RESULT_FILE = "result.json"
# Beside a training run's checkpoints: the settings they were trained under (resumed only if equal).
CHECKPOINT_SETTINGS_FILE = "compare_settings.json"
RunKind = Literal["base", "experts", "multitask", "post_hoc", "many_shot"]
MIXED_TASK = "all_tasks_mixed"  # the one task of the multi-task SFT run


@dataclass(frozen=True)
class Run:
    kind: RunKind
    seed: int | None = None
    method: str | None = None

    @property
    def folder(self) -> str:
        if self.kind == "base":
            return "base"
        name = self.kind if self.method is None else f"{self.kind}-{self.method}"
        return f"seed{self.seed}/{name}"

    @property
    def label(self) -> str:
        if self.kind == "base":
            return "base model"
        what = {
            "experts": "experts (each task alone)",
            "multitask": "multi-task SFT (all tasks' data mixed)",
        }.get(self.kind, f"{self.kind} {self.method}")
        return f"seed {self.seed}: {what}"


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
        dropped = compare_drops_training_params(recipe)
        if dropped:
            raise RecipeError(f"compare: {dropped}")
        self.tasks = build_tasks(recipe.tasks)
        self.task_names = list(self.tasks)
        self._check_validation_scores_tokens()
        # A bad training override or many-shot merge setting fails now, not hours in.
        for name in dict.fromkeys([*recipe.compare.variants, *recipe.compare.many_shot_methods]):
            kind = "many_shot" if name in recipe.compare.many_shot_methods else "post_hoc"
            try:
                self._args(self.output_dir, Run(kind, recipe.seed, name))
            except RecipeError as err:
                where = f"compare.variants.{name}" if name in recipe.compare.variants else f"compare: {name}"
                raise RecipeError(f"{where}: {err}") from err
        retention = [spec for spec in recipe.evaluation.retention if not spec.harness]
        files = ensure_bigbench([spec.bigbench for spec in retention if spec.bigbench])  # before any training
        self.retention = {
            spec.name: load_multiple_choice(spec.path or files[spec.bigbench], spec.size, spec.seed)
            for spec in retention
        }
        for seed in recipe.compare.seeds:  # experts given: every folder checked before any work
            self.expert_sources(seed)
        for name in recipe.compare.post_hoc_methods:  # many-shot ones: checked by their config above
            method, params = recipe.compare.resolve(name)
            searched = searched_scale(params)
            if searched and (searched != "scale" or "scale" not in get_merge_method(method).parameters):
                raise RecipeError(
                    f"compare: {name}: post hoc searches `scale`, which {method} does not take."
                )

    # --- helpers ------------------------------------------------------------------------------

    def _check_validation_scores_tokens(self) -> None:
        """Every task's validation set keeps a scored token within max_length, as training
        requires: else every validation loss is 0 and a scale search or a loss gap means nothing."""
        from metis_hf.training.trainer import gaps_on_completion, scored_examples

        args = self._args(self.output_dir, Run("base"))
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

    def _scale_is_searched(self, run: Run) -> bool:
        """A post-hoc run with ``scale: auto`` (many-shot runs search every round, in the trainer)."""
        searched = run.method is not None and self.recipe.compare.resolve(run.method)[1].get("scale") == AUTO
        return searched and run.kind == "post_hoc"

    def _args(self, folder: Path, run: Run, **extra: Any):
        name = run.method or "task_arithmetic"
        method, params = self.recipe.compare.resolve(name)
        searched = searched_scale(params)
        if searched and run.kind != "many_shot":
            params[searched] = 1.0  # a placeholder the post-hoc search replaces (the config checks a number)
        return metis_config_from_recipe(
            self.recipe,
            folder / "trainer",
            seed=run.seed if run.seed is not None else self.recipe.seed,
            merge_method=method,
            merge_params=params,
            **self._checkpointing(),
            **{**self.recipe.compare.training_overrides(name), **extra},
        )

    def _checkpointing(self) -> dict[str, Any]:
        """MetisConfig fields for a run's checkpoints: the last two kept (should the process die
        while writing one, the one before it is whole)."""
        steps = self.recipe.compare.checkpoint_steps
        return {"save_strategy": "steps", "save_steps": steps, "save_total_limit": 2} if steps else {}

    @property
    def score_names(self) -> list[str]:
        """The columns of the tables: the training tasks (when scored by generation), then the
        harness scores."""
        ev = self.recipe.evaluation
        return (self.task_names if ev.generation else []) + [h.name for h in ev.harness]

    def _evaluate(
        self, model, tokenizer, task_names: list[str] | None = None, losses_only: bool = False
    ) -> dict[str, Any]:
        """Scores (generation and harness) and validation losses. With ``task_names`` (an expert),
        only those tasks and the harness scores they are the expert of; ``losses_only``: no scores."""
        ev, args = self.recipe.evaluation, self._args(self.output_dir, Run("base"))
        names = task_names or self.task_names
        loss_kwargs = dict(
            loss_batch_size=args.gap_batch_size or args.per_device_train_batch_size,
            max_length=args.max_length or 512,
            completion_only_loss=bool(args.completion_only_loss),
        )
        results = evaluate_model(
            model,
            tokenizer,
            {t: self.tasks[t] for t in names},
            split=ev.split,
            limit=ev.limit,
            batch_size=ev.batch_size,
            max_new_tokens=ev.max_new_tokens,
            generate=ev.generation and not losses_only,
            **loss_kwargs,
        )
        losses = {
            "losses": {t: r.loss for t, r in results.items()},
            "answer_losses": {t: r.answer_loss for t, r in results.items()},
        }
        if losses_only:
            return {"scores": {}, **losses}
        scores = {t: dataclasses.asdict(r) for t, r in results.items()} if ev.generation else {}
        wanted = [h for h in ev.harness if task_names is None or h.expert in task_names]
        metrics = self._harness_metrics(
            model, tokenizer, [(h.tasks, h.num_fewshot, ev.harness_limit) for h in wanted]
        )
        for harness in wanted:
            value = self._harness_value(
                metrics, harness.tasks, harness.metric, harness.num_fewshot, ev.harness_limit
            )
            scores[harness.name] = {"task": harness.name, "score": value, "exact_match": value, "n": None}
        result = {"scores": scores, **losses}
        if task_names is None and ev.retention:  # a model scored on everything: also what it kept
            result["retention"] = self._retention(model, tokenizer)
        return result

    def _harness_metrics(self, model, tokenizer, requests) -> dict[tuple, dict[str, dict[str, float]]]:
        """Harness metrics for ``requests`` of (tasks, num_fewshot, limit): one harness call per
        distinct (num_fewshot, limit), whatever the number of scores asking for it."""
        from metis_hf.evaluation.harness import run_harness

        groups: dict[tuple, list[str]] = {}
        for tasks, fewshot, limit in requests:
            group = groups.setdefault((fewshot, limit), [])
            group += [t for t in tasks if t not in group]
        ev = self.recipe.evaluation
        return {
            key: run_harness(
                model,
                tokenizer,
                tasks,
                include_path=ev.harness_include,
                limit=key[1],
                batch_size=ev.harness_batch_size,
                num_fewshot=key[0],
            )
            for key, tasks in groups.items()
        }

    @staticmethod
    def _harness_value(metrics, tasks: list[str], metric: str, fewshot, limit) -> float:
        """The mean of ``metric`` over ``tasks`` (an error names a task that does not report it)."""
        found = metrics[(fewshot, limit)]
        missing = [t for t in tasks if metric not in found.get(t, {})]
        if missing:
            raise ValueError(f"Harness task {missing[0]!r} reports no metric {metric!r}.")
        return sum(found[t][metric] for t in tasks) / len(tasks)

    def _retention(self, model, tokenizer) -> dict[str, dict[str, Any]]:
        """Accuracy on each retention task (with its items' 0/1 where scored here)."""
        specs = self.recipe.evaluation.retention
        metrics = self._harness_metrics(
            model, tokenizer, [(s.harness, None, s.size) for s in specs if s.harness]
        )
        out = {}
        for spec in specs:
            if spec.harness:
                out[spec.name] = {
                    "accuracy": self._harness_value(metrics, spec.harness, spec.metric, None, spec.size)
                }
            else:
                out[spec.name] = multiple_choice_accuracy(
                    model, tokenizer, self.retention[spec.name], spec.name
                )
        return out

    def most_common_answers(self) -> dict[str, dict[str, Any]]:
        """Per task scored by generation, its most common answer on the evaluated items and the
        scores of always giving it: what an expert that learned only the answer distribution gets."""
        ev = self.recipe.evaluation
        return most_common_answers(self.tasks, ev.split, ev.limit) if ev.generation else {}

    def _result(self, run: Run) -> dict[str, Any]:
        return json.loads((self.output_dir / "runs" / run.folder / RESULT_FILE).read_text())

    def _trainer(self, args, settings: dict[str, Any], train=None, validation=None):
        """A MetisTrainer on the recipe's model and LoRA (the recipe's tasks unless given), and the
        checkpoint to resume from: the latest one an interrupted run under the same ``settings``
        left in ``args.output_dir`` (None: that folder is emptied and the run starts anew)."""
        from metis_hf.training import MetisTrainer

        folder = Path(args.output_dir)
        checkpoint = self._interrupted_checkpoint(folder, settings)
        if checkpoint is None:
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            write_json(folder / CHECKPOINT_SETTINGS_FILE, settings)
        else:
            print(f"[metis-hf compare] resuming an interrupted run from {checkpoint}", flush=True)
        model, tokenizer = load_model_and_tokenizer(self.recipe.model)
        trainer = MetisTrainer(
            model=model,
            args=args,
            train_dataset=train or {t: task.train for t, task in self.tasks.items()},
            eval_dataset=validation or {t: task.validation for t, task in self.tasks.items()},
            processing_class=tokenizer,
            peft_config=lora_config_from_recipe(self.recipe),
        )
        return trainer, checkpoint

    def _interrupted_checkpoint(self, folder: Path, settings: dict[str, Any]) -> Path | None:
        """The latest complete checkpoint in ``folder`` if it was trained under ``settings``."""
        from metis_hf.training.trainer import STATE_FILE

        saved = folder / CHECKPOINT_SETTINGS_FILE
        if not self.recipe.compare.checkpoint_steps or not saved.is_file():
            return None
        if json.loads(saved.read_text()) != settings:
            print(f"[metis-hf compare] {folder}: checkpoints of other settings, starting over", flush=True)
            return None
        complete = [  # the Trainer's files, then ours (written last)
            path
            for path in folder.glob("checkpoint-*")
            if (path / "trainer_state.json").is_file() and (path / STATE_FILE).is_file()
        ]
        return max(complete, key=_step_of, default=None)

    def _train(
        self, run: Run, folder: Path, protocol: str, args=None, train=None, validation=None, resume_from=None
    ):
        """A MetisTrainer run (this run's settings unless given), from the run's own checkpoint if it
        was interrupted, else from ``resume_from`` if given; the trainer and what to record of the
        training (seconds, and the step it resumed at)."""
        if args is None:
            args = self._args(folder, run, protocol=protocol, save_task_adapters=protocol == "post_hoc")
        trainer, checkpoint = self._trainer(args, self.settings(run), train, validation)
        start = time.time()
        start_from = checkpoint or resume_from
        trainer.train(resume_from_checkpoint=str(start_from) if start_from else None)
        record: dict[str, Any] = {"train_seconds": time.time() - start}
        if checkpoint is not None:  # the seconds are this process's only
            record["resumed_at_step"] = _step_of(checkpoint)
        trainer.save_model(str(folder / "adapter"))
        return trainer, record

    def _branch_group(self, run: Run) -> tuple[list[Run], Path]:
        """The seed's many-shot runs that train exactly as ``run`` up to round 1's merge, and the
        folder of their shared branch point (named by a digest of those training settings)."""
        from metis_hf.training.trainer import training_signature

        def signature(other: Run) -> str:
            args = self._args(self.output_dir, other, protocol="many_shot")
            return json.dumps(training_signature(args), sort_keys=True, default=str)

        mine = signature(run)
        runs = [Run("many_shot", run.seed, m) for m in self.recipe.compare.many_shot_methods]
        group = [other for other in runs if signature(other) == mine]
        digest = hashlib.sha256(mine.encode()).hexdigest()[:10]
        return group, self.output_dir / "runs" / f"seed{run.seed}" / f"branch_point-{digest}"

    def _branch_point(self, run: Run) -> tuple[Path, float] | None:
        """The checkpoint before round 1's merge that ``run`` shares with the seed's other many-shot
        runs that train alike (trained by the first of them to need it), and the seconds it took;
        None when the run trains alone."""
        if not self.recipe.compare.branch_many_shot:
            return None
        group, folder = self._branch_group(run)
        if len(group) < 2:
            return None
        if not (folder / "branch_point.json").is_file():
            tmp = folder.with_name(folder.name + ".tmp")
            shared = {k: v for k, v in self.settings(run).items() if k != "method"}
            trainer, interrupted = self._trainer(self._args(tmp, run, protocol="many_shot"), shared)
            start = time.time()
            checkpoint = Path(trainer.train_to_branch_point(0, resume_from_checkpoint=interrupted))
            info = {"checkpoint": str(checkpoint.relative_to(tmp)), "seconds": time.time() - start}
            if interrupted is not None:
                info["resumed_at_step"] = _step_of(interrupted)
            info["runs"] = [other.method for other in group]
            write_json(tmp / "branch_point.json", info)
            replace_dir(tmp, folder)
        info = json.loads((folder / "branch_point.json").read_text())
        return folder / info["checkpoint"], info["seconds"]

    def _drop_branch_point(self, run: Run) -> None:
        """Once every run of a branch point's group has its result, the checkpoint goes."""
        group, folder = self._branch_group(run)
        if all((self.output_dir / "runs" / other.folder / RESULT_FILE).is_file() for other in group):
            shutil.rmtree(folder, ignore_errors=True)

    # --- the four kinds of run ----------------------------------------------------------------

    def run_base(self, run: Run, folder: Path) -> dict[str, Any]:
        model, tokenizer = load_model_and_tokenizer(self.recipe.model)
        return self._evaluate(model, tokenizer)

    def expert_sources(self, seed: int) -> dict[str, Path] | None:
        """Adapter folders of experts trained before, per task (None: train them here)."""
        given = self.recipe.compare.experts
        if given is None:
            return None
        if isinstance(given, str):
            root = Path(given) / "runs" / Run("experts", seed).folder / "adapter" / "task_adapters"
            sources = {t: root / t for t in self.task_names}
        else:
            unknown, missing = (
                sorted(set(given) - set(self.task_names)),
                sorted(set(self.task_names) - set(given)),
            )
            if unknown or missing:
                raise RecipeError(
                    f"compare.experts: tasks {unknown or missing} are {'not in the recipe' if unknown else 'missing'}."
                )
            sources = {t: Path(given[t]) for t in self.task_names}
        for task, source in sources.items():
            for name in ("adapter_config.json", "adapter_model.safetensors"):
                if not (source / name).is_file():
                    raise RecipeError(
                        f"compare.experts: {task}: no {name} in {source} (a PEFT adapter folder)."
                    )
            try:
                self._check_expert(source)
            except ValueError as err:
                raise RecipeError(f"compare.experts: {task}: {source}: {err}") from err
        return sources

    def _check_expert(self, source: Path) -> None:
        """An expert fits the recipe's model and LoRA settings, with finite weights: checked before
        any work, rather than by PEFT or the merge after the base model is scored."""
        from safetensors import safe_open

        from metis_hf.workflows.plan import model_shape

        config = json.loads((source / "adapter_config.json").read_text())
        lora = lora_config_from_recipe(self.recipe)

        def targets(value: Any) -> list[str]:  # a list, or one name or regex
            return sorted([value] if isinstance(value, str) else value or [])

        wanted = {"r": lora.r, "target_modules": targets(lora.target_modules)}
        found = {"r": config.get("r"), "target_modules": targets(config.get("target_modules"))}
        for key in wanted:
            if wanted[key] != found[key]:
                raise ValueError(f"{key} is {found[key]}, the recipe's lora has {wanted[key]}")
        shape = model_shape(self.recipe.model)
        modules = shape.module_shapes()
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
                            f"({self.recipe.model}) and lora give {expected}: trained on another model?"
                        )
                if not torch.isfinite(tensor).all():
                    raise ValueError(f"tensor {key!r} holds NaN or infinite values")

    def run_experts(self, run: Run, folder: Path) -> dict[str, Any]:
        sources = self.expert_sources(run.seed)
        if sources is not None:
            return self._read_experts(folder, sources)
        trainer, record = self._train(run, folder, "post_hoc")
        result: dict[str, Any] = {
            "scores": {},
            "losses": {},
            "answer_losses": {},
            **record,
            "optimizer_steps": trainer.state.global_step,
        }
        for task in self.task_names:  # each expert on its own task: the normalization
            trainer.peft_model.set_adapter(task)
            own = self._evaluate(trainer.peft_model, trainer.processing_class, [task])
            for field in ("scores", "losses", "answer_losses"):
                result[field].update(own[field])
        return result

    def _read_experts(self, folder: Path, sources: dict[str, Path]) -> dict[str, Any]:
        """Experts trained before: copied to where post-hoc merges read them, each scored on its
        own task."""
        from peft import PeftModel

        adapters = folder / "adapter" / "task_adapters"
        for task, source in sources.items():
            tmp = adapters / f".{task}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            for name in ("adapter_config.json", "adapter_model.safetensors"):
                shutil.copy2(source / name, tmp / name)
            replace_dir(tmp, adapters / task)
        model, tokenizer = load_model_and_tokenizer(self.recipe.model)
        result: dict[str, Any] = {"scores": {}, "losses": {}, "answer_losses": {}, "experts_from": {}}
        for task in self.task_names:
            peft_model = PeftModel.from_pretrained(model, str(adapters / task), adapter_name=task)
            own = self._evaluate(peft_model, tokenizer, [task])
            for field in ("scores", "losses", "answer_losses"):
                result[field].update(own[field])
            result["experts_from"][task] = str(sources[task])
            model = peft_model.unload()  # the base again, for the next task's adapter
        return result

    def run_multitask(self, run: Run, folder: Path) -> dict[str, Any]:
        """Multi-task SFT, the joint-training reference: one adapter trained on every task's
        training data mixed (shuffled with the run's seed), for as many optimizer steps as all the
        experts together, then scored on every task."""
        from datasets import concatenate_datasets

        def mixed(split: str):
            return concatenate_datasets([getattr(task, split) for task in self.tasks.values()])

        # All the experts' steps together; counted in epochs instead, the mix is already T times longer.
        local_steps = self._args(folder, run).local_steps
        steps = local_steps * len(self.tasks) if local_steps else None
        args = metis_config_from_recipe(
            self.recipe,
            folder / "trainer",
            seed=run.seed,
            protocol="post_hoc",
            merge_method="task_arithmetic",
            merge_params={"scale": 1.0},  # the merge of one adapter is that adapter
            local_steps=steps,
            **self._checkpointing(),
        )
        train = {MIXED_TASK: mixed("train").shuffle(seed=run.seed)}
        trainer, record = self._train(run, folder, "post_hoc", args, train, {MIXED_TASK: mixed("validation")})
        trainer.peft_model.set_adapter("default")
        return {
            **self._evaluate(trainer.peft_model, trainer.processing_class),
            **record,
            "optimizer_steps": trainer.state.global_step,
        }

    def run_post_hoc(self, run: Run, folder: Path) -> dict[str, Any]:
        from safetensors.torch import load_file, save_file

        from metis_hf.merging.task_vectors import lora_scaling, merge_lora_states
        from metis_hf.training.rounds import merge_parameters

        experts_dir = self.output_dir / "runs" / Run("experts", run.seed).folder / "adapter" / "task_adapters"
        states = [load_file(experts_dir / t / "adapter_model.safetensors") for t in self.task_names]
        base = run_losses(self._result(Run("base")))
        experts = run_losses(self._result(Run("experts", run.seed)))
        # G_0 is the base model: a post-hoc METIS gap is the base's loss minus the expert's.
        gaps = {t: base[t] - experts[t] for t in self.task_names}
        args = self._args(folder, run)
        method = args.merge_method  # a variant's registered method
        sizes = {t: len(self.tasks[t].train) for t in self.task_names}
        params, weights = merge_parameters(args, method, self.task_names, 0, gaps, base, sizes, base)
        adapter_config = json.loads((experts_dir / self.task_names[0] / "adapter_config.json").read_text())
        rank = adapter_config["r"]
        scaling = lora_scaling(rank, adapter_config["lora_alpha"], adapter_config.get("use_rslora", False))
        if args.merge_space == "core":  # a post-hoc merge of T rank-r adapters, exactly: rank T * r
            root = math.sqrt if adapter_config.get("use_rslora") else float
            rank = rank * len(states)
            adapter_config.update(r=rank, lora_alpha=scaling * root(rank))

        def merged_adapter(params: dict[str, Any], where: Path) -> float | None:
            merged, truncation = merge_lora_states(
                method, states, args.merge_space, rank, scaling, names=self.task_names, **params
            )
            tmp = where.with_name(where.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            (tmp / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))
            save_file({k: v.contiguous() for k, v in merged.items()}, tmp / "adapter_model.safetensors")
            shutil.rmtree(where, ignore_errors=True)
            os.replace(tmp, where)
            return truncation

        search = None
        if self._scale_is_searched(run):

            def validation_loss(scale: float) -> float:  # the mean over tasks, of the merge at scale
                merged_adapter({**params, "scale": scale}, folder / "candidate")
                model, tokenizer = load_for_evaluation(folder / "candidate", tokenizer=self.recipe.model)
                return multitask_loss(self._evaluate(model, tokenizer, losses_only=True))

            params["scale"], search = search_scale(validation_loss)
            shutil.rmtree(folder / "candidate", ignore_errors=True)
            weights = get_merge_method(method).weights_of(params, len(states))
        truncation = merged_adapter(params, folder / "adapter")
        model, tokenizer = load_for_evaluation(folder / "adapter", tokenizer=self.recipe.model)
        result = {
            **self._evaluate(model, tokenizer),
            "weights": dict(zip(self.task_names, weights)),
            "loss_gaps": gaps if get_merge_method(method).uses_loss_gaps else None,
            "truncation_error": truncation,
        }
        if search is not None:
            result["scale_search"] = {"chosen": params["scale"], "validation_loss": search}
        return result

    def run_many_shot(self, run: Run, folder: Path) -> dict[str, Any]:
        branch = self._branch_point(run)
        trainer, record = self._train(run, folder, "many_shot", resume_from=branch and branch[0])
        trainer.peft_model.set_adapter("default")
        result = {
            **self._evaluate(trainer.peft_model, trainer.processing_class),
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
            method, params = self.recipe.compare.resolve(run.method)
            settings["method"] = {
                "name": method,
                "params": params,
                "training": self.recipe.compare.training_overrides(run.method),
            }
        return json.loads(json.dumps(settings))  # as it reads back from result.json

    def _experts_to_rebuild(self, run: Run) -> bool:
        """Whether a finished experts run must run again: its adapters are gone (a folder kept
        with its results only) and a post-hoc run of its seed has yet to merge them."""
        if run.kind != "experts":
            return False
        adapters = self.output_dir / "runs" / run.folder / "adapter" / "task_adapters"
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
            self._drop_branch_point(run)
        print(f"[metis-hf compare] run {index}/{total} finished in {result['seconds']:.0f} s", flush=True)
        return result


_TRAINED_SECTIONS = ("model", "tasks", "evaluation", "lora", "training")
_VERSIONED = ("metis-hf", "torch", "transformers", "peft", "trl", "reasoning-gym")


def _step_of(checkpoint: Path) -> int:
    return int(checkpoint.name.split("-")[1])  # the Trainer's checkpoint-<global step>


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
    report = build_report(results, comparison.score_names, recipe.compare, comparison.most_common_answers())
    report["recipe"] = str(recipe_path) if recipe_path else "embedded offline default"
    report["overrides"] = list(overrides or [])
    written = write_report(report, output_dir, plots=plots)
    info = card_info_for(
        "comparison",
        "metis",
        "compare",
        recipe.model,
        datasets=recipe_datasets(recipe),
        tasks=comparison.score_names,
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
