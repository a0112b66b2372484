"""lm-evaluation-harness in process (extra ``lm-eval``): a loaded model or adapter on harness tasks.

The paper evaluates with the harness (ifeval, gsm8k_cot, m_mmlu_*, arc_*, hellaswag_*); its task
names work here unchanged where the harness can reach their datasets. ``include_path`` adds a folder
of custom task YAMLs (for instance over a local JSONL file, which is how this runs offline).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any


@functools.cache
def task_manager(include_path: str | None = None):
    """The harness's task index (it reads every task YAML, tens of seconds): built once per folder."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path)


def run_harness(
    model,
    tokenizer,
    tasks: Sequence[str],
    include_path: str | None = None,
    limit: int | float | None = None,
    batch_size: int = 8,
    num_fewshot: int | None = None,
) -> dict[str, dict[str, float]]:
    """Harness metrics per task, e.g. ``{"gsm8k_cot": {"exact_match,strict-match": 0.41}}``."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError as err:
        raise ImportError("lm-evaluation-harness is not installed: pip install 'metis-hf[lm-eval]'.") from err
    if not tasks:
        raise ValueError("No harness task given.")
    manager = task_manager(include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        where = f" (custom tasks from {include_path})" if include_path else ""
        raise ValueError(f"Unknown lm-evaluation-harness task {unknown[0]!r}{where}.")
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    output: dict[str, Any] = lm_eval.simple_evaluate(
        model=lm,
        tasks=list(tasks),
        task_manager=manager,
        limit=limit,
        num_fewshot=num_fewshot,
        log_samples=False,
    )
    return {
        task: {name: float(value) for name, value in metrics.items() if isinstance(value, int | float)}
        for task, metrics in output["results"].items()
    }
