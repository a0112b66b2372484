"""How far one LoRA adapter gets on one reasoning-gym task within a CPU budget (demo task choice).

For each task: SmolLM2-135M-Instruct, one LoRA (the reference's r=16 on q/k/v/o), STEPS optimizer
steps of 2 x 4 sequences at lr 3e-4 through MetisTrainer with a single task (post-hoc protocol, so
no merge changes the adapter), then the score and exact match on 60 test items.

    python scripts/single_task_pilot.py --steps 80 chain_sum family_relationships spell_backward
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("tasks", nargs="+")
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--out", default="/tmp/metis-hf-pilot")
    args = parser.parse_args()

    from _shared import independent_adapters_trainer

    from metis_hf.data import build_task
    from metis_hf.evaluation import score_task
    from metis_hf.models import load_model_and_tokenizer

    for name in args.tasks:
        start = time.time()
        task = build_task({"name": name, "train_size": 800, "validation_size": 16, "test_size": 60})
        model, tokenizer = load_model_and_tokenizer("smollm2-135m-instruct")
        trainer = independent_adapters_trainer(
            model, tokenizer, {name: task}, args.steps, f"{args.out}/{name}"
        )
        trainer.train()
        result = score_task(trainer.peft_model, tokenizer, task, batch_size=30, max_new_tokens=16)
        print(
            json.dumps(
                {
                    "task": name,
                    "score": result.score,
                    "exact": result.exact_match,
                    "seconds": round(time.time() - start),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
