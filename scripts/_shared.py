"""Shared by the scripts in this folder (run as `python scripts/<script>.py`, which puts this folder on the path)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def seed_folders(output_dir: Path) -> list[Path]:
    """A compare output's runs/seed<N> folders, in seed order (seed10 after seed2)."""
    return sorted(
        (output_dir / "runs").glob("seed*"), key=lambda folder: int(folder.name.removeprefix("seed"))
    )


def independent_adapters_trainer(model, tokenizer, tasks, steps: int, output_dir: str, **config):
    """A MetisTrainer that trains each task's adapter on its own for ``steps`` optimizer steps from
    the shared initialisation (post-hoc protocol, one round): the merge comes only at the end.
    ``config`` overrides MetisConfig fields (learning rate, batch size, completion-only loss)."""
    from metis_hf import MetisConfig
    from metis_hf.workflows.train import trainer_for_tasks

    settings = {
        "protocol": "post_hoc",
        "num_rounds": 1,
        "local_steps": steps,
        "merge_method": "task_arithmetic",
        "use_cpu": True,
        "disable_tqdm": True,
        "logging_steps": 1000,
        **config,
    }
    return trainer_for_tasks(model, tokenizer, MetisConfig(output_dir=output_dir, **settings), tasks)
