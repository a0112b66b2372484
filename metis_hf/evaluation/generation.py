"""Batched greedy generation with left padding, each answer checked by its task's scorer."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

from metis_hf.data import Task, extract_answer
from metis_hf.logs import warn_once
from metis_hf.scoring import METRICS

logger = logging.getLogger(__name__)


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


def evaluation_rows(task: Task, split: str = "test", limit: int | None = None):
    """The items a task is scored on: the split's first ``limit`` rows (an error when none)."""
    data = task.split(split)
    if limit is not None:
        data = data.select(range(min(limit, len(data))))
    if len(data) == 0:
        raise ValueError(f"Task {task.name!r}: split {split!r} is empty; nothing to evaluate.")
    return data


def score_answers(task: Task, rows: Sequence[Mapping], answers: Sequence[str]) -> TaskScore:
    """Every registered metric of ``answers``, one per row: per item, in the rows' order, and
    their mean.

    A model's answer is untrusted input to the task's checker: an answer whose check raises
    (reasoning-gym's prime_factorization on "3 = 18") scores 0, and a warning counts them."""
    items: dict[str, list[float]] = {}
    for metric in METRICS.values():
        values, failures = [], []
        for answer, row in zip(answers, rows, strict=True):
            try:
                values.append(metric.of_item(task, answer, row))
            except Exception as err:  # noqa: BLE001 - any checker's error on any answer
                values.append(0.0)
                failures.append(f"{answer!r} ({type(err).__name__}: {err})")
        if failures:
            logger.warning(
                f"Task {task.name!r}: the answer checker raised on {len(failures)} of {len(rows)} answers, "
                f"each scored 0; the first: {failures[0]}."
            )
        items[metric.name] = values
    means = {name: sum(values) / len(rows) for name, values in items.items()}
    per_item = {METRICS[name].item_field: values for name, values in items.items()}
    return TaskScore(task.name, n=len(rows), **means, **per_item)


def answers_over_budget(tokenizer, answers: Sequence[str], max_new_tokens: int) -> list[int]:
    """The token counts of the gold answers longer than ``max_new_tokens``: generation stops before
    it could write them whole (counted on the answer alone, so within a token of what follows a prompt)."""
    lengths = (len(tokenizer(str(answer), add_special_tokens=False)["input_ids"]) for answer in answers)
    return [n for n in lengths if n > max_new_tokens]


def score_task(
    model,
    tokenizer,
    task: Task,
    split: str = "test",
    limit: int | None = None,
    batch_size: int = 32,
    max_new_tokens: int = 32,
) -> TaskScore:
    data = evaluation_rows(task, split, limit)
    too_long = answers_over_budget(tokenizer, data["answer"], max_new_tokens)
    if too_long:
        warn_once(
            __name__,
            f"{task.name}: {len(too_long)} of {len(data)} gold answers are longer than max_new_tokens="
            f"{max_new_tokens} (up to {max(too_long)} tokens): generation stops before it can write them. "
            "Raise evaluation.max_new_tokens.",
        )
    answers = generate_answers(model, tokenizer, data["prompt"], batch_size, max_new_tokens, desc=task.name)
    return score_answers(task, list(data), answers)


def most_common_answer(task: Task, split: str = "test", limit: int | None = None) -> tuple[str, TaskScore]:
    """The most common gold answer of the items ``score_task`` scores (answers compared as exact
    match compares them; a tie goes to the answer met first), and the score of always giving it:
    what a model that learned the answer distribution and not the task scores."""
    data = evaluation_rows(task, split, limit)
    answer = Counter(" ".join(str(a).split()) for a in data["answer"]).most_common(1)[0][0]
    return answer, score_answers(task, list(data), [answer] * len(data))


def most_common_answers(
    tasks: Mapping[str, Task], split: str = "test", limit: int | None = None
) -> dict[str, dict]:
    """``most_common_answer`` of every task, as the report reads it: the answer (``answer``) beside
    the fields of the ``TaskScore`` of always giving it."""
    out = {}
    for name, task in tasks.items():
        answer, score = most_common_answer(task, split, limit)
        out[name] = {"answer": answer, **asdict(score)}
    return out


def score_tasks(model, tokenizer, tasks: Mapping[str, Task], **kwargs) -> dict[str, TaskScore]:
    return {name: score_task(model, tokenizer, task, **kwargs) for name, task in tasks.items()}


def format_score_table(results: Mapping[str, Mapping[str, TaskScore]]) -> str:
    """A markdown table: one row per task, a score and exact-match column pair per model; with two
    models scored item by item, a last column with the second's exact-match gain over the first
    and its 95% paired-bootstrap interval over the test items, and a line saying what it shows."""
    from metis_hf.evaluation.uncertainty import paired_gains

    models = list(results)
    tasks = list(next(iter(results.values()))) if results else []
    gains = None
    if len(models) == 2 and tasks and all(results[m][t].item_exact_matches for m in models for t in tasks):
        first, second = (results[m] for m in models)
        gains = paired_gains(
            {t: first[t].item_exact_matches for t in tasks}, {t: second[t].item_exact_matches for t in tasks}
        )
    gain_header = f" {models[1]} - {models[0]} exact [95%] |" if gains else ""
    header = "| task | " + " | ".join(f"{m} score | {m} exact" for m in models) + " |" + gain_header
    lines = [header, "|---" * (1 + 2 * len(models) + bool(gains)) + "|"]

    def gain_cell(key: str) -> str:
        if not gains:
            return ""
        value, low, high = gains[key]
        return f" {value:+.3f} [{low:+.3f}, {high:+.3f}] |"

    for task in tasks:
        cells = " | ".join(
            f"{results[m][task].score:.3f} | {results[m][task].exact_match:.3f}" for m in models
        )
        lines.append(f"| {task} | {cells} |{gain_cell(task)}")
    if tasks:
        means = " | ".join(
            f"{sum(results[m][t].score for t in tasks) / len(tasks):.3f} | "
            f"{sum(results[m][t].exact_match for t in tasks) / len(tasks):.3f}"
            for m in models
        )
        lines.append(f"| **mean** | {means} |{gain_cell('mean')}")
    if gains:
        above = [t for t in tasks if gains[t][1] > 0]
        below = [t for t in tasks if gains[t][2] < 0]
        lines.append(
            f"\n{models[1]} is above {models[0]} beyond the 95% interval on {len(above)} of {len(tasks)} "
            f"tasks{f', below it on {len(below)}' if below else ''}; mean exact-match gain "
            f"{gains['mean'][0]:+.3f} [{gains['mean'][1]:+.3f}, {gains['mean'][2]:+.3f}]."
        )
    return "\n".join(lines)
