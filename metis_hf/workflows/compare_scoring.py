"""How ``metis-hf compare`` scores a model: the recipe's tasks by generation, harness scores,
validation losses and retention tasks."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from metis_hf.data import Task
from metis_hf.evaluation.generation import most_common_answers
from metis_hf.evaluation.retention import ensure_bigbench, load_multiple_choice, multiple_choice_accuracy
from metis_hf.evaluation.suite import evaluate_model
from metis_hf.recipe import Recipe


class Scorer:
    """Scores models on a recipe's tasks the same way for every run of a grid."""

    def __init__(self, recipe: Recipe, tasks: Mapping[str, Task], loss_settings: dict[str, Any]) -> None:
        """``loss_settings``: the validation losses' batch size, max_length and token set, as
        training measures them (``loss_batch_size``, ``max_length``, ``completion_only_loss``)."""
        self.recipe = recipe
        self.tasks = tasks
        self.task_names = list(tasks)
        self.loss_settings = loss_settings
        retention = [spec for spec in recipe.evaluation.retention if not spec.harness]
        files = ensure_bigbench([spec.bigbench for spec in retention if spec.bigbench])  # before any training
        self.retention_items = {
            spec.name: load_multiple_choice(spec.path or files[spec.bigbench], spec.size, spec.seed)
            for spec in retention
        }

    @property
    def score_names(self) -> list[str]:
        """The columns of the tables: the training tasks (when scored by generation), then the
        harness scores."""
        ev = self.recipe.evaluation
        return (self.task_names if ev.generation else []) + [h.name for h in ev.harness]

    def evaluate(
        self, model, tokenizer, task_names: list[str] | None = None, losses_only: bool = False
    ) -> dict[str, Any]:
        """Scores (generation and harness) and validation losses. With ``task_names`` (an expert),
        only those tasks and the harness scores they are the expert of; ``losses_only``: no scores."""
        ev = self.recipe.evaluation
        names = task_names or self.task_names
        results = evaluate_model(
            model,
            tokenizer,
            {t: self.tasks[t] for t in names},
            split=ev.split,
            limit=ev.limit,
            batch_size=ev.batch_size,
            max_new_tokens=ev.max_new_tokens,
            generate=ev.generation and not losses_only,
            **self.loss_settings,
        )
        losses = {
            "losses": {t: r.loss for t, r in results.items()},
            "answer_losses": {t: r.answer_loss for t, r in results.items()},
        }
        if losses_only:
            return {"scores": {}, **losses}
        scores = {t: dataclasses.asdict(r) for t, r in results.items()} if ev.generation else {}
        wanted = [h for h in ev.harness if task_names is None or h.expert in task_names]
        metrics = self.harness_metrics(
            model, tokenizer, [(h.tasks, h.num_fewshot, ev.harness_limit) for h in wanted]
        )
        for harness in wanted:
            value = harness_value(
                metrics, harness.tasks, harness.metric, harness.num_fewshot, ev.harness_limit
            )
            scores[harness.name] = {"task": harness.name, "score": value, "exact_match": value, "n": None}
        result = {"scores": scores, **losses}
        if task_names is None and ev.retention:  # a model scored on everything: also what it kept
            result["retention"] = self.retention(model, tokenizer)
        return result

    def harness_metrics(self, model, tokenizer, requests) -> dict[tuple, dict[str, dict[str, float]]]:
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

    def retention(self, model, tokenizer) -> dict[str, dict[str, Any]]:
        """Accuracy on each retention task (with its items' 0/1 where scored here)."""
        specs = self.recipe.evaluation.retention
        metrics = self.harness_metrics(
            model, tokenizer, [(s.harness, None, s.size) for s in specs if s.harness]
        )
        out = {}
        for spec in specs:
            if spec.harness:
                out[spec.name] = {
                    "accuracy": harness_value(metrics, spec.harness, spec.metric, None, spec.size)
                }
            else:
                out[spec.name] = multiple_choice_accuracy(
                    model, tokenizer, self.retention_items[spec.name], spec.name
                )
        return out

    def most_common_answers(self) -> dict[str, dict[str, Any]]:
        """Per task scored by generation, its most common answer on the evaluated items and the
        scores of always giving it: what an expert that learned only the answer distribution gets."""
        ev = self.recipe.evaluation
        return most_common_answers(self.tasks, ev.split, ev.limit) if ev.generation else {}


def harness_value(metrics, tasks: list[str], metric: str, fewshot, limit) -> float:
    """The mean of ``metric`` over ``tasks`` (an error names a task that does not report it)."""
    found = metrics[(fewshot, limit)]
    missing = [t for t in tasks if metric not in found.get(t, {})]
    if missing:
        raise ValueError(f"Harness task {missing[0]!r} reports no metric {metric!r}.")
    return sum(found[t][metric] for t in tasks) / len(tasks)
