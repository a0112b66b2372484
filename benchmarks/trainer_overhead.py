"""MetisTrainer's overhead against a plain TRL SFTTrainer at equal training sequences.

Both train LoRA (the reference's r=16 on q/k/v/o) on SmolLM2-135M-Instruct, micro-batch 2 x 4
accumulation, on the same four reasoning-gym tasks. MetisTrainer runs ROUNDS rounds of STEPS
optimizer steps per task with METIS merges and loss-gap validation included; SFTTrainer trains one
adapter on the shuffled mix for the same total number of optimizer steps. Each run is its own
process (peak RSS comparable); the table gives wall time (model load excluded), sequences per
second and peak RSS, and the ratios.

    python benchmarks/trainer_overhead.py --rounds 2 --steps 10
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

TASKS = ["chain_sum", "family_relationships", "spell_backward", "gcd"]


def _peak_rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(kind: str, rounds: int, steps: int, out: str, val_size: int) -> None:
    from datasets import concatenate_datasets
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from metis_hf import MetisConfig
    from metis_hf.data import build_tasks
    from metis_hf.models import load_model_and_tokenizer
    from metis_hf.training.lora import default_lora_config
    from metis_hf.workflows.train import trainer_for_tasks

    tasks = build_tasks(
        [{"name": t, "train_size": 400, "validation_size": val_size, "test_size": 1} for t in TASKS]
    )
    model, tokenizer = load_model_and_tokenizer("smollm2-135m-instruct")
    total_steps = rounds * steps * len(TASKS)
    common = dict(
        output_dir=out,
        use_cpu=True,
        disable_tqdm=True,
        report_to="none",
        logging_steps=50,
        seed=0,
        learning_rate=3e-4,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=4,
        max_length=512,
        completion_only_loss=False,
        activation_checkpointing=False,
        bf16=False,
        save_strategy="no",
    )
    if kind == "metis":
        args = MetisConfig(num_rounds=rounds, local_steps=steps, **common)
        trainer = trainer_for_tasks(model, tokenizer, args, tasks, default_lora_config())
    else:
        mixed = concatenate_datasets(
            [t.train.select_columns(["prompt", "completion"]) for t in tasks.values()]
        )
        trainer = SFTTrainer(
            model=model,
            args=SFTConfig(max_steps=total_steps, lr_scheduler_type="linear", **common),
            train_dataset=mixed.shuffle(seed=0),
            processing_class=tokenizer,
            peft_config=LoraConfig(
                **{
                    k: v
                    for k, v in default_lora_config().to_dict().items()
                    if k in LoraConfig.__dataclass_fields__
                }
            ),
        )
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    sequences = total_steps * 8
    print(
        json.dumps(
            {"kind": kind, "seconds": seconds, "sequences": sequences, "peak_rss_mib": _peak_rss_mib()}
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10, help="Optimizer steps per task per round.")
    parser.add_argument("--child", choices=["metis", "sft"], help=argparse.SUPPRESS)
    parser.add_argument("--out", default="/tmp/metis-hf-bench")
    parser.add_argument("--val-size", type=int, default=32, help="Validation examples per task (the gaps).")
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.rounds, args.steps, os.path.join(args.out, args.child), args.val_size)
    results = {}
    for kind in ("sft", "metis"):
        command = [
            sys.executable,
            __file__,
            "--child",
            kind,
            "--rounds",
            str(args.rounds),
            "--steps",
            str(args.steps),
            "--out",
            args.out,
            "--val-size",
            str(args.val_size),
        ]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        results[kind] = json.loads(done.stdout.strip().splitlines()[-1])
    sft, metis = results["sft"], results["metis"]
    print(
        f"{len(TASKS)} tasks, {args.rounds} rounds x {args.steps} steps per task, {sft['sequences']} training "
        f"sequences each, {args.val_size} validation examples per task\n"
    )
    print("| trainer | seconds | sequences/s | peak RSS MiB |")
    print("|---|---|---|---|")
    for name, r in (("SFTTrainer, one LoRA on the mix", sft), ("MetisTrainer (METIS, merges + gaps)", metis)):
        print(
            f"| {name} | {r['seconds']:.1f} | {r['sequences'] / r['seconds']:.2f} | {r['peak_rss_mib']:.0f} |"
        )
    print(f"\nwall-time ratio MetisTrainer / SFTTrainer: {metis['seconds'] / sft['seconds']:.3f}")
    print(f"peak-memory ratio MetisTrainer / SFTTrainer: {metis['peak_rss_mib'] / sft['peak_rss_mib']:.3f}")


if __name__ == "__main__":
    main()
