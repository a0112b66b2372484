"""How ``metis-hf compare`` trains a run: its MetisConfig, checkpoints an interrupted run resumes
from, and the round-1 branch points that many-shot runs which train alike share."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from metis_hf.data import Task
from metis_hf.files import replace_dir, write_json
from metis_hf.merging.scale_search import searched_scale
from metis_hf.recipe import Recipe, compare_merge_spec, metis_config_from_recipe
from metis_hf.workflows.train import trainer_from_recipe

RESULT_FILE = "result.json"
# Beside a training run's checkpoints: the settings they were trained under (resumed only if equal).
CHECKPOINT_SETTINGS_FILE = "compare_settings.json"
RunKind = Literal["base", "experts", "multitask", "post_hoc", "many_shot"]


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


class RunTraining:
    """Trains the runs of one compare grid under ``output_dir/runs``."""

    def __init__(self, recipe: Recipe, tasks: Mapping[str, Task], output_dir: Path) -> None:
        self.recipe = recipe
        self.tasks = tasks
        self.output_dir = output_dir

    def args(self, folder: Path, run: Run, **extra: Any):
        """``run``'s MetisConfig: the recipe's training section, the run's method, its variant's
        training overrides and ``extra``, with checkpoints in ``folder/trainer``."""
        name = run.method or "task_arithmetic"
        spec = compare_merge_spec(self.recipe, name)
        method, params = spec.method, dict(spec.params)
        searched = searched_scale(params)
        if searched and run.kind != "many_shot":
            params[searched] = 1.0  # a placeholder the post-hoc search replaces (the config checks a number)
        return metis_config_from_recipe(
            self.recipe,
            folder / "trainer",
            seed=run.seed if run.seed is not None else self.recipe.seed,
            merge_method=method,
            merge_params=params,
            **self.checkpointing(),
            **{**self.recipe.compare.training_overrides(name), **extra},
        )

    def checkpointing(self) -> dict[str, Any]:
        """MetisConfig fields for a run's checkpoints: the last two kept (should the process die
        while writing one, the one before it is whole)."""
        steps = self.recipe.compare.checkpoint_steps
        return {"save_strategy": "steps", "save_steps": steps, "save_total_limit": 2} if steps else {}

    def trainer(self, args, settings: dict[str, Any], tasks: Mapping[str, Task] | None = None):
        """A MetisTrainer on the recipe's model and LoRA (the recipe's tasks unless given), and the
        checkpoint to resume from: the latest one an interrupted run under the same ``settings``
        left in ``args.output_dir`` (None: that folder is emptied and the run starts anew)."""
        folder = Path(args.output_dir)
        checkpoint = self.interrupted_checkpoint(folder, settings)
        if checkpoint is None:
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            write_json(folder / CHECKPOINT_SETTINGS_FILE, settings)
        else:
            print(f"[metis-hf compare] resuming an interrupted run from {checkpoint}", flush=True)
        return trainer_from_recipe(self.recipe, args, tasks or self.tasks), checkpoint

    def interrupted_checkpoint(self, folder: Path, settings: dict[str, Any]) -> Path | None:
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
        return max(complete, key=step_of, default=None)

    def train(
        self, folder: Path, args, settings: dict[str, Any], tasks=None, resume_from: Path | None = None
    ):
        """A MetisTrainer run, from the run's own checkpoint if it was interrupted, else from
        ``resume_from`` if given, its merged adapter saved in ``folder/adapter``; the trainer and
        what to record of the training (seconds, and the step it resumed at)."""
        trainer, checkpoint = self.trainer(args, settings, tasks)
        start = time.time()
        start_from = checkpoint or resume_from
        trainer.train(resume_from_checkpoint=str(start_from) if start_from else None)
        record: dict[str, Any] = {"train_seconds": time.time() - start}
        if checkpoint is not None:  # the seconds are this process's only
            record["resumed_at_step"] = step_of(checkpoint)
        trainer.save_model(str(folder / "adapter"))
        return trainer, record

    # --- branch points ------------------------------------------------------------------------

    def branch_group(self, run: Run) -> tuple[list[Run], Path]:
        """The seed's many-shot runs that train exactly as ``run`` up to round 1's merge, and the
        folder of their shared branch point (named by a digest of those training settings)."""
        from metis_hf.training.trainer import training_signature

        def signature(other: Run) -> str:
            args = self.args(self.output_dir, other, protocol="many_shot")
            return json.dumps(training_signature(args), sort_keys=True, default=str)

        mine = signature(run)
        runs = [Run("many_shot", run.seed, m) for m in self.recipe.compare.many_shot_methods]
        group = [other for other in runs if signature(other) == mine]
        digest = hashlib.sha256(mine.encode()).hexdigest()[:10]
        return group, self.output_dir / "runs" / f"seed{run.seed}" / f"branch_point-{digest}"

    def branch_point(self, run: Run, settings: dict[str, Any]) -> tuple[Path, float] | None:
        """The checkpoint before round 1's merge that ``run`` shares with the seed's other many-shot
        runs that train alike (trained by the first of them to need it), and the seconds it took;
        None when the run trains alone. ``settings``: the run's, which the trunk shares but for
        its method."""
        if not self.recipe.compare.branch_many_shot:
            return None
        group, folder = self.branch_group(run)
        if len(group) < 2:
            return None
        if not (folder / "branch_point.json").is_file():
            tmp = folder.with_name(folder.name + ".tmp")
            shared = {k: v for k, v in settings.items() if k != "method"}
            trainer, interrupted = self.trainer(self.args(tmp, run, protocol="many_shot"), shared)
            start = time.time()
            checkpoint = Path(trainer.train_to_branch_point(0, resume_from_checkpoint=interrupted))
            info = {"checkpoint": str(checkpoint.relative_to(tmp)), "seconds": time.time() - start}
            if interrupted is not None:
                info["resumed_at_step"] = step_of(interrupted)
            info["runs"] = [other.method for other in group]
            write_json(tmp / "branch_point.json", info)
            replace_dir(tmp, folder)
        info = json.loads((folder / "branch_point.json").read_text())
        return folder / info["checkpoint"], info["seconds"]

    def drop_branch_point(self, run: Run) -> None:
        """Once every run of a branch point's group has its result, the checkpoint goes."""
        group, folder = self.branch_group(run)
        if all((self.output_dir / "runs" / other.folder / RESULT_FILE).is_file() for other in group):
            shutil.rmtree(folder, ignore_errors=True)


def step_of(checkpoint: Path) -> int:
    return int(checkpoint.name.split("-")[1])  # the Trainer's checkpoint-<global step>
