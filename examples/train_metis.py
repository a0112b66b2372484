# Copyright 2026 The metis-hf developers. Licensed under the Apache License, Version 2.0.
"""Many-shot merging of per-task LoRA adapters, in the shape of TRL's ``trl/scripts/sft.py``.

Each task names a Hub dataset or a local JSON/JSONL/CSV/Parquet file with prompt/completion (or
instruction/response, or chat ``messages``) columns; a validation split is carved from its train
split when the source has none.

```bash
python examples/train_metis.py \
    --model_name_or_path HuggingFaceTB/SmolLM2-135M-Instruct \
    --task_datasets math=data/math.jsonl code=my-org/code-sft \
    --merge_method metis --num_rounds 5 --local_steps 125 \
    --output_dir SmolLM2-METIS --push_to_hub
```

```bash
python examples/train_metis.py --config recipe.yaml --learning_rate 1e-4   # flags override the file
```
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from trl import ModelConfig, TrlParser, get_peft_config

from metis_hf import MetisConfig, MetisTrainer
from metis_hf.data import TaskSpec, build_task
from metis_hf.models import load_model, load_tokenizer


@dataclass
class MetisScriptArguments:
    task_datasets: list[str] = field(
        metadata={"help": "One NAME=DATASET per task: a Hub dataset id or a local data file."}
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration."})
    dataset_train_split: str = field(default="train", metadata={"help": "The split to train on."})
    dataset_validation_split: str = field(
        default="validation", metadata={"help": "The validation split (carved from train when missing)."}
    )
    max_train_samples: int = field(default=1000, metadata={"help": "Training examples per task."})
    validation_size: int = field(default=100, metadata={"help": "Validation examples per task."})


def task_specs(script_args: MetisScriptArguments) -> list[TaskSpec]:
    specs = []
    for item in script_args.task_datasets:
        name, sep, dataset = item.partition("=")
        if not sep or not name or not dataset:
            raise ValueError(f"--task_datasets {item!r}: expected NAME=DATASET.")
        local = os.path.exists(dataset)
        specs.append(
            TaskSpec(
                name=name,
                source="file" if local else "hub",
                dataset=dataset,
                config_name=script_args.dataset_config,
                splits={
                    "train": script_args.dataset_train_split,
                    "validation": script_args.dataset_validation_split,
                },
                train_size=script_args.max_train_samples,
                validation_size=script_args.validation_size,
                test_size=1,  # unused here: `metis-hf eval` scores test splits
            )
        )
    return specs


def main(script_args: MetisScriptArguments, training_args: MetisConfig, model_args: ModelConfig) -> None:
    tasks = [build_task(spec) for spec in task_specs(script_args)]
    # ModelConfig's dtype and revision as TRL's sft.py passes them; float32 unless asked otherwise.
    model = load_model(
        model_args.model_name_or_path,
        dtype=model_args.dtype if model_args.dtype not in (None, "auto") else "float32",
        revision=model_args.model_revision,
        attn_implementation=model_args.attn_implementation,
    )
    trainer = MetisTrainer(
        model=model,
        args=training_args,
        train_dataset={task.name: task.train for task in tasks},
        eval_dataset={task.name: task.validation for task in tasks},
        processing_class=load_tokenizer(model_args.model_name_or_path),
        peft_config=get_peft_config(model_args),  # None: the METIS reference's LoRA (r 16 on q/k/v/o)
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(f"Merged adapter saved to {training_args.output_dir}.")
    if training_args.push_to_hub:
        url = trainer.push_to_hub()
        trainer.accelerator.print(f"Pushed to {url}.")
    trainer.end()  # ends the trackers and the process group; a group left to exit can abort


if __name__ == "__main__":
    parser = TrlParser((MetisScriptArguments, MetisConfig, ModelConfig))
    main(*parser.parse_args_and_config())
