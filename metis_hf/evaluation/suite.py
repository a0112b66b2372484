"""``metis-hf eval``: a model, merged checkpoint or PEFT adapter scored on every task.

Per task: accuracy by batched greedy generation checked by the task's scorer (and exact match),
and the validation loss. With expert scores, the normalized score and its average and worst task.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from metis_hf.data import Task, TaskSpec, dataset_reference
from metis_hf.evaluation.generation import TaskScore, score_task
from metis_hf.hub import ALL_TASKS, CardResult, read_card_info, write_card
from metis_hf.models import load_model, load_tokenizer
from metis_hf.scoring import get_metric
from metis_hf.training.loss import task_losses


def card_results(
    scores: Mapping[str, TaskScore],
    specs: Sequence[TaskSpec],
    split: str,
    metric: str = "exact_match",
    experts: Mapping[str, float] | None = None,
) -> list[CardResult]:
    """A card's ``model-index`` results: each task's ``metric`` on the ``split`` it was scored on
    (its dataset named by ``dataset_reference``, with the items scored) and the Avg and Worst over
    the tasks; with ``experts``, the same again normalized (merged / expert)."""
    from metis_hf.evaluation.combine import summarize

    if not scores:
        return []
    references = {spec.name: dataset_reference(spec, split, scores[spec.name].n) for spec in specs}
    values = scores_of(scores, metric)
    every_task = {
        "dataset_type": ALL_TASKS,
        "dataset_name": "all tasks: " + ", ".join(values),
        "dataset_split": split,
    }
    kinds = [(metric, None)] + ([(f"normalized_{metric}", experts)] if experts else [])
    results = []
    for name, divisors in kinds:
        summary = summarize(values, divisors)
        results += [CardResult(t, name, value, **references[t]) for t, value in summary["normalized"].items()]
        results.append(CardResult("Avg", name, summary["average"], **every_task))
        results.append(CardResult("Worst", name, summary["worst"], **every_task))
    return results


def harness_card_results(harness: Mapping[str, Mapping[str, Any]]) -> list[CardResult]:
    """lm-evaluation-harness metrics (``acc,none``...) as card results; standard errors left out."""
    return [
        CardResult(task, key.split(",")[0], float(value), task, f"lm-evaluation-harness {task}")
        for task, metrics in harness.items()
        for key, value in metrics.items()
        if isinstance(value, int | float) and "stderr" not in key
    ]


def check_tokenizer(model, tokenizer, name: str = "tokenizer") -> None:
    """Refuse a tokenizer whose token ids the model cannot embed (a tokenizer from another model)."""
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        raise ValueError(
            f"The {name} has {len(tokenizer)} tokens but the model embeds only {rows}: "
            "they do not belong to the same model."
        )
    for special in ("eos_token_id", "pad_token_id", "bos_token_id"):
        token_id = getattr(tokenizer, special, None)
        if token_id is not None and token_id >= rows:
            raise ValueError(f"The {name}'s {special} ({token_id}) is outside the model's {rows} embeddings.")


def check_adapter_weights(folder: Path) -> None:
    """An adapter folder's weights are a whole safetensors file (pickles are never loaded)."""
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        pickled = [p.name for p in folder.glob("adapter_model.bin")]
        why = (
            f"only {pickled[0]}, a pickle metis-hf does not load"
            if pickled
            else "no adapter_model.safetensors"
        )
        raise FileNotFoundError(f"Adapter folder {str(folder)!r} has {why}.")
    from safetensors import safe_open

    try:
        with safe_open(str(weights), "pt") as handle:
            handle.keys()
    except Exception as err:  # noqa: BLE001 - safetensors' own errors do not name the file
        raise ValueError(f"{weights}: not a readable safetensors file ({err}).") from err


def load_for_evaluation(model_or_adapter: str | os.PathLike, tokenizer: str | None = None, **model_kwargs):
    """A model by built-in name, Hub id or folder; a PEFT adapter folder loads on its recorded base.
    The tokenizer comes from ``tokenizer`` when given, else the folder, else the base model."""
    path = Path(str(model_or_adapter))
    adapter_config = path / "adapter_config.json"
    if adapter_config.is_file():
        from peft import PeftModel

        check_adapter_weights(path)
        base_name = json.loads(adapter_config.read_text()).get("base_model_name_or_path")
        if not base_name:
            raise ValueError(f"{adapter_config}: no base_model_name_or_path; cannot tell the base model.")
        model = PeftModel.from_pretrained(load_model(base_name, **model_kwargs), str(path))
        has_tokenizer = (path / "tokenizer_config.json").is_file()
        tokenizer_source = tokenizer or (str(path) if has_tokenizer else base_name)
    else:
        if not path.exists() and str(model_or_adapter).startswith((".", "/", "~")):
            raise FileNotFoundError(f"Model folder {str(model_or_adapter)!r} does not exist.")
        model = load_model(model_or_adapter, **model_kwargs)
        tokenizer_source = tokenizer or str(model_or_adapter)
    loaded = load_tokenizer(tokenizer_source)
    check_tokenizer(model, loaded, f"tokenizer from {tokenizer_source}")
    return model, loaded


def evaluate_model(
    model,
    tokenizer,
    tasks: Mapping[str, Task],
    split: str = "test",
    limit: int | None = None,
    batch_size: int = 32,
    max_new_tokens: int = 24,
    loss_split: str | None = "validation",
    loss_batch_size: int = 8,
    max_length: int = 512,
    completion_only_loss: bool = False,
    generate: bool = True,
) -> dict[str, TaskScore]:
    """Score and (unless ``loss_split`` is None) validation loss of ``model`` on every task: on
    the trained tokens (``loss``) and on the answer tokens (``answer_loss``).
    ``generate=False`` measures the losses only (scores NaN)."""
    check_tokenizer(model, tokenizer)
    results = {}
    for name, task in tasks.items():
        if generate:
            result = score_task(model, tokenizer, task, split, limit, batch_size, max_new_tokens)
        else:
            result = TaskScore(name, math.nan, math.nan, 0)
        if loss_split is not None:
            data = task.split(loss_split)
            if len(data) == 0:
                raise ValueError(f"Task {name!r}: split {loss_split!r} is empty; no loss to measure.")
            losses = task_losses(  # the answer tokens' loss comes from the same forward
                model,
                tokenizer,
                data,
                loss_batch_size,
                max_length,
                ("all", "completion"),
                f"{name} {loss_split}",
            )
            result.loss = losses["completion" if completion_only_loss else "all"]
            result.answer_loss = losses["completion"]
        results[name] = result
    return results


def scores_of(results: Mapping[str, TaskScore], field: str = "score") -> dict[str, float]:
    get_metric(field)
    return {task: float(getattr(r, field)) for task, r in results.items()}


def results_table(results: Mapping[str, TaskScore], summary: Mapping[str, Any] | None = None) -> str:
    """Markdown: score, exact match, loss (and normalized score) per task, then the summary."""
    normalized = (summary or {}).get("normalized", {})
    header = "| task | n | score | exact match | val loss |" + (" normalized |" if normalized else "")
    lines = [header, "|---" * (5 + bool(normalized)) + "|"]
    for task, r in results.items():
        loss = f"{r.loss:.3f}" if r.loss is not None else "-"
        row = f"| {task} | {r.n} | {r.score:.3f} | {r.exact_match:.3f} | {loss} |"
        if normalized:
            row += f" {normalized[task]:.3f} |"
        lines.append(row)
    if summary:
        lines.append(
            f"\nAverage {summary['average']:.3f}, worst {summary['worst']:.3f} ({summary['worst_task']}), "
            f"gap {summary['gap']:+.3f}"
        )
    return "\n".join(lines)


def read_expert_scores(path: str | os.PathLike, metric: str) -> dict[str, float]:
    """Per-task expert scores from a JSON file: ``{task: score}``, ``{task: {metric: score}}``,
    or the output of ``metis-hf eval --output`` (its ``tasks`` entry)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"--experts {str(path)!r}: cannot read it as JSON: {err}") from err
    data = data.get("tasks", data) if isinstance(data, dict) else data
    if not isinstance(data, dict):
        raise ValueError(f"--experts {str(path)!r}: expected a mapping of task to score.")
    scores_by_task = {}
    for task, value in data.items():
        value = value.get(metric) if isinstance(value, dict) else value
        if not isinstance(value, int | float):
            raise ValueError(f"--experts {str(path)!r}: task {task!r} has no numeric {metric!r} score.")
        scores_by_task[task] = float(value)
    return scores_by_task


def run_eval(
    model: str | os.PathLike,
    *,
    recipe: str | os.PathLike | None = None,
    tasks: Sequence[str] = (),
    tokenizer: str | None = None,
    split: str | None = None,
    limit: int | None = None,
    test_size: int = 200,
    validation_size: int = 100,
    batch_size: int | None = None,
    max_new_tokens: int | None = None,
    loss: bool = True,
    experts: str | os.PathLike | None = None,
    metric: str = "exact_match",
    harness: Sequence[str] = (),
    harness_include: str | None = None,
    harness_limit: int | None = None,
    output: str | os.PathLike | None = None,
    overrides: Sequence[str] = (),
    card: bool = False,
) -> dict[str, Any]:
    """Score ``model`` (built-in name, Hub id, folder or PEFT adapter) on the tasks of ``recipe`` or
    on the reasoning-gym ``tasks`` (``test_size``/``validation_size`` items each), and on
    lm-evaluation-harness ``harness`` tasks. Unset generation settings come from the recipe's
    evaluation section (else its defaults). With ``experts`` (a JSON of per-task expert scores, or
    an earlier eval output), adds normalized scores on ``metric``. Returns (and with ``output``
    writes) the results. With ``card``, the results also go into the card of ``model``, a folder
    metis-hf wrote, as its ``model-index`` metadata and results table (``metis-hf push`` uploads it)."""
    from metis_hf.data import build_tasks
    from metis_hf.evaluation.combine import summarize
    from metis_hf.recipe import EvaluationSpec, load_recipe

    if recipe and tasks:
        raise ValueError("Give --recipe or --tasks, not both.")
    if not (recipe or tasks or harness):
        raise ValueError("Nothing to evaluate: give --tasks, --recipe or --harness.")
    get_metric(metric)
    card_info = read_card_info(model) if card and Path(model).is_dir() else None
    if card and card_info is None:
        raise ValueError(f"--card: {model} is not a folder that metis-hf wrote (it has no metis_card.json).")
    expert_scores = read_expert_scores(experts, metric) if experts else None
    evaluation, specs = EvaluationSpec(), []
    if recipe:
        loaded = load_recipe(recipe, list(overrides))
        evaluation, specs = loaded.evaluation, loaded.tasks
    elif tasks:
        specs = [TaskSpec(name=t, validation_size=validation_size, test_size=test_size) for t in tasks]
    built = build_tasks(specs) if specs else {}
    loaded_model, loaded_tokenizer = load_for_evaluation(model, tokenizer)
    results_out: dict[str, Any] = {"model": str(model)}
    if built:
        results = evaluate_model(
            loaded_model,
            loaded_tokenizer,
            built,
            split=split or evaluation.split,
            limit=limit if limit is not None else evaluation.limit,
            batch_size=batch_size or evaluation.batch_size,
            max_new_tokens=max_new_tokens or evaluation.max_new_tokens,
            loss_split="validation" if loss else None,
        )
        results_out["tasks"] = {t: dataclasses.asdict(r) for t, r in results.items()}
        summary = summarize(scores_of(results, metric), expert_scores) if expert_scores else None
        if summary:
            results_out["summary"] = summary
        print(results_table(results, summary))
    if harness:
        from metis_hf.evaluation.harness import run_harness

        results_out["harness"] = run_harness(
            loaded_model, loaded_tokenizer, list(harness), harness_include, harness_limit
        )
        for task, metrics in results_out["harness"].items():
            print(f"{task}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    if card_info is not None:
        card_info.results = (
            card_results(results, specs, split or evaluation.split, metric, expert_scores) if built else []
        )
        card_info.results += harness_card_results(results_out.get("harness", {}))
        write_card(model, card_info)
        print(f"[metis-hf eval] the results are in {Path(model) / 'README.md'}'s model-index metadata")
    if output:
        from metis_hf.files import write_json

        Path(output).parent.mkdir(parents=True, exist_ok=True)
        write_json(Path(output), results_out)
    return results_out
