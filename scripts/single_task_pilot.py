"""How far one LoRA adapter gets on one reasoning-gym task within a CPU budget (task and schedule
choice for the offline recipes).

For each task: SmolLM2-135M-Instruct, one LoRA (the reference's r=16 on q/k/v/o) trained alone for
STEPS optimizer steps (post-hoc protocol, so no merge changes the adapter), then exact match and
score on the test items, beside the base model's on the same items, with the number of distinct
test prompts and the share of the test items whose answer is the most common one (the score of
always giving it). One JSON line per task.

    python scripts/single_task_pilot.py --steps 80 chain_sum family_relationships spell_backward
    python scripts/single_task_pilot.py --steps 60 --lr 1e-3 --batch 8 --completion-only \
        --test-size 200 count_bits leg_counting
    python scripts/single_task_pilot.py --config 'number_sorting={"min_numbers": 3, "max_numbers": 4}' \
        number_sorting
"""

from __future__ import annotations

import argparse
import collections
import json
import time


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("tasks", nargs="+")
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--batch", type=int, default=8, help="Sequences per optimizer step.")
    parser.add_argument("--completion-only", action="store_true", help="Loss on answer tokens only.")
    parser.add_argument("--train-size", type=int, default=800)
    parser.add_argument("--test-size", type=int, default=60)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--out", default="/tmp/metis-hf-pilot")
    parser.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="TASK=JSON",
        help="A task's reasoning-gym generator settings (the recipe's generator_config); repeatable.",
    )
    args = parser.parse_args()
    configs = {}
    for given in args.config:
        task_name, _, settings = given.partition("=")
        configs[task_name] = json.loads(settings)
    if set(configs) - set(args.tasks):
        parser.error(f"--config for a task not listed: {sorted(set(configs) - set(args.tasks))}")

    from _shared import independent_adapters_trainer

    from metis_hf.data import build_task
    from metis_hf.evaluation import score_task
    from metis_hf.models import load_model_and_tokenizer

    for name in args.tasks:
        start = time.time()
        spec = {
            "name": name,
            "train_size": args.train_size,
            "validation_size": 16,
            "test_size": args.test_size,
            "generator_config": configs.get(name, {}),
        }
        task = build_task(spec)
        answers = collections.Counter(str(a) for a in task.test["answer"])
        model, tokenizer = load_model_and_tokenizer("smollm2-135m-instruct")
        base = score_task(model, tokenizer, task, batch_size=50, max_new_tokens=args.max_new_tokens)
        trainer = independent_adapters_trainer(
            model,
            tokenizer,
            {name: task},
            args.steps,
            f"{args.out}/{name}",
            learning_rate=args.lr,
            per_device_train_batch_size=args.batch,
            gradient_accumulation_steps=1,
            completion_only_loss=args.completion_only,
        )
        trainer.train()
        result = score_task(
            trainer.peft_model, tokenizer, task, batch_size=50, max_new_tokens=args.max_new_tokens
        )
        print(
            json.dumps(
                {
                    "task": name,
                    "base_exact": base.exact_match,
                    "exact": result.exact_match,
                    "base_score": round(base.score, 3),
                    "score": round(result.score, 3),
                    "distinct_test_prompts": len(set(task.test["prompt"])),
                    "most_common_answer_share": round(max(answers.values()) / len(task.test), 3),
                    "seconds": round(time.time() - start),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
