"""Batched greedy generation with left padding, each answer checked by its task's scorer."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from metis_hf.data import Task, exact_match, extract_answer


@dataclass
class TaskScore:
    task: str
    score: float  # mean of the task's scorer (reasoning-gym gives partial credit on some tasks)
    exact_match: float
    n: int
    loss: float | None = None  # mean validation loss per example, when measured
    answer_loss: float | None = None  # the same on the answer (completion) tokens only
    # per test item, in order: what the report's intervals resample
    item_scores: list[float] = field(default_factory=list)
    item_exact_matches: list[float] = field(default_factory=list)


@torch.no_grad()
def generate_answers(
    model,
    tokenizer,
    prompts: Sequence[str],
    batch_size: int = 32,
    max_new_tokens: int = 32,
    desc: str | None = None,
) -> list[str]:
    """Greedy answers for ``prompts``, in order. Prompts are batched by length to limit padding."""
    if not prompts:
        return []
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    previous_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers: list[str] = [""] * len(prompts)
    try:
        for start in tqdm(range(0, len(order), batch_size), desc=desc or "generating", leave=False):
            batch_ids = order[start : start + batch_size]
            encoded = tokenizer([prompts[i] for i in batch_ids], return_tensors="pt", padding=True).to(device)
            output = model.generate(
                **encoded,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                stop_strings=["\n\n"],
                tokenizer=tokenizer,
            )
            new_tokens = output[:, encoded["input_ids"].shape[1] :]
            for i, text in zip(batch_ids, tokenizer.batch_decode(new_tokens, skip_special_tokens=True)):
                answers[i] = extract_answer(text)
    finally:
        tokenizer.padding_side = previous_side
        model.train(was_training)
    return answers


def score_task(
    model,
    tokenizer,
    task: Task,
    split: str = "test",
    limit: int | None = None,
    batch_size: int = 32,
    max_new_tokens: int = 32,
) -> TaskScore:
    data = task.split(split)
    if limit is not None:
        data = data.select(range(min(limit, len(data))))
    if len(data) == 0:
        raise ValueError(f"Task {task.name!r}: split {split!r} is empty; nothing to evaluate.")
    answers = generate_answers(model, tokenizer, data["prompt"], batch_size, max_new_tokens, desc=task.name)
    rows = list(data)
    scores = [float(task.score(a, row)) for a, row in zip(answers, rows)]
    matches = [float(exact_match(a, row["answer"])) for a, row in zip(answers, rows)]
    return TaskScore(
        task.name,
        sum(scores) / len(rows),
        sum(matches) / len(rows),
        len(rows),
        item_scores=scores,
        item_exact_matches=matches,
    )


def score_tasks(model, tokenizer, tasks: Mapping[str, Task], **kwargs) -> dict[str, TaskScore]:
    return {name: score_task(model, tokenizer, task, **kwargs) for name, task in tasks.items()}


def format_score_table(results: Mapping[str, Mapping[str, TaskScore]]) -> str:
    """A markdown table: one row per task, a score and exact-match column pair per model."""
    models = list(results)
    tasks = list(next(iter(results.values()))) if results else []
    header = "| task | " + " | ".join(f"{m} score | {m} exact" for m in models) + " |"
    lines = [header, "|---" * (1 + 2 * len(models)) + "|"]
    for task in tasks:
        cells = " | ".join(
            f"{results[m][task].score:.3f} | {results[m][task].exact_match:.3f}" for m in models
        )
        lines.append(f"| {task} | {cells} |")
    if tasks:
        means = " | ".join(
            f"{sum(results[m][t].score for t in tasks) / len(tasks):.3f} | "
            f"{sum(results[m][t].exact_match for t in tasks) / len(tasks):.3f}"
            for m in models
        )
        lines.append(f"| **mean** | {means} |")
    return "\n".join(lines)
