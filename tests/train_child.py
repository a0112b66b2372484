"""A training run in a child process, for the kill-and-resume test.

    python -m tests.train_child OUTPUT_DIR [--kill-at-step N] [--resume] [--accum N]
    torchrun --nproc-per-node 2 -m tests.train_child OUTPUT_DIR --accum 1

Writes the final merged adapter to OUTPUT_DIR/final. With --kill-at-step, the process SIGKILLs
itself at the end of that optimizer step (after any checkpoint of that step was written).
"""

from __future__ import annotations

import argparse
import os
import signal

from transformers import TrainerCallback

from tests.conftest import make_tiny_model, make_tokenizer
from tests.test_trainer import LORA, TRAIN, VAL


class KillAt(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_save = True  # let the Trainer write this step's checkpoint first

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    from peft import LoraConfig

    from metis_hf import MetisConfig, MetisTrainer

    parser = argparse.ArgumentParser()
    parser.add_argument("output_dir")
    parser.add_argument("--kill-at-step", type=int, default=None)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--accum", type=int, default=2, help="Gradient accumulation steps.")
    parser.add_argument("--checkpoints", action="store_true", help="Save a checkpoint every 4 steps.")
    args = parser.parse_args()
    tokenizer = make_tokenizer()
    config = MetisConfig(
        output_dir=args.output_dir,
        num_rounds=2,
        local_steps=3,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=args.accum,
        max_length=64,
        use_cpu=True,
        seed=3,
        disable_tqdm=True,
        save_strategy="steps" if args.checkpoints or args.kill_at_step or args.resume else "no",
        save_steps=4,
    )
    trainer = MetisTrainer(
        model=make_tiny_model(len(tokenizer), seed=0),
        args=config,
        train_dataset=TRAIN,
        eval_dataset=VAL,
        processing_class=tokenizer,
        peft_config=LoraConfig(**LORA),
        callbacks=[KillAt(args.kill_at_step)] if args.kill_at_step else None,
    )
    trainer.train(resume_from_checkpoint=True if args.resume else None)
    trainer.save_model(os.path.join(args.output_dir, "final"))


if __name__ == "__main__":
    main()
