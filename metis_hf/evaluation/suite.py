"""``metis-hf eval``: a model, merged checkpoint or PEFT adapter scored on every task.

Per task: accuracy by batched greedy generation checked by the task's scorer (and exact match),
and the validation loss. With expert scores, the normalized score and its average and worst task.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from metis_hf.data import Task
from metis_hf.evaluation.generation import TaskScore, score_task
from metis_hf.evaluation.loss import task_loss
from metis_hf.models import load_model, load_tokenizer

SCORE_FIELDS = ("score", "exact_match")


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


def load_for_evaluation(model_or_adapter: str | os.PathLike, tokenizer: str | None = None, **model_kwargs):
    """A model by built-in name, Hub id or folder; a PEFT adapter folder loads on its recorded base.
    The tokenizer comes from ``tokenizer`` when given, else the folder, else the base model."""
    path = Path(str(model_or_adapter))
    adapter_config = path / "adapter_config.json"
    if adapter_config.is_file():
        from peft import PeftModel

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
) -> dict[str, TaskScore]:
    """Score and (unless ``loss_split`` is None) validation loss of ``model`` on every task."""
    check_tokenizer(model, tokenizer)
    results = {}
    for name, task in tasks.items():
        result = score_task(model, tokenizer, task, split, limit, batch_size, max_new_tokens)
        if loss_split is not None:
            data = task.split(loss_split)
            if len(data) == 0:
                raise ValueError(f"Task {name!r}: split {loss_split!r} is empty; no loss to measure.")
            result.loss = task_loss(
                model,
                tokenizer,
                data,
                loss_batch_size,
                max_length,
                completion_only_loss,
                f"{name} {loss_split}",
            )
        results[name] = result
    return results


def scores_of(results: Mapping[str, TaskScore], field: str = "score") -> dict[str, float]:
    if field not in SCORE_FIELDS:
        raise ValueError(f"Unknown score field {field!r}; choose one of {SCORE_FIELDS}.")
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
