"""`make demo`: the offline default recipe end to end."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from metis_hf.data import build_tasks
from metis_hf.evaluation import format_score_table, score_tasks
from metis_hf.models import load_model_and_tokenizer
from metis_hf.recipe import load_recipe


def run_demo(
    recipe: str | None = None, output_dir: str = "outputs/demo", overrides: list[str] | None = None
) -> dict:
    config = load_recipe(recipe, overrides)
    start = time.time()
    print(f"[metis-hf demo] model {config.model}; tasks {[t.name for t in config.tasks]}")
    model, tokenizer = load_model_and_tokenizer(config.model)
    tasks = build_tasks(config.tasks)
    ev = config.evaluation
    base = score_tasks(
        model,
        tokenizer,
        tasks,
        split=ev.split,
        limit=ev.limit,
        batch_size=ev.batch_size,
        max_new_tokens=ev.max_new_tokens,
    )
    table = format_score_table({"base": base})
    print(table)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = {"recipe": recipe or "embedded offline default", "base": {k: vars(v) for k, v in base.items()}}
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=2))
    os.replace(tmp, out / "results.json")
    print(f"[metis-hf demo] done in {time.time() - start:.0f} s; results in {out / 'results.json'}")
    return results
