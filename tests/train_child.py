"""A training run in a child process, for the kill-and-resume test.

    python -m tests.train_child OUTPUT_DIR [--kill-at-step N [--no-save-at-kill]] [--resume] [--accum N]
        [--checkpoints --save-steps N] [--schedule sequential|interleaved|parallel|task_parallel]
        [--four-tasks] [--merge-method M]
    torchrun --nproc-per-node 2 -m tests.train_child OUTPUT_DIR --accum 1

Writes the final merged adapter and the Trainer's log history to OUTPUT_DIR/final. With --kill-at-step, the process SIGKILLs
itself at the end of that optimizer step (after any checkpoint of that step was written).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
from pathlib import Path

from transformers import TrainerCallback

from tests.conftest import make_tiny_model, make_tokenizer
from tests.test_trainer import LORA, TRAIN, VAL, _data

# A fourth task, so that 2 and 4 processes split the tasks evenly (task_parallel).
FOURTH_TRAIN, FOURTH_VAL = {"add4": _data(14, 4)}, {"add4": _data(5, 4, 50)}


class KillAt(TrainerCallback):
    """SIGKILL at the end of optimizer step ``step``: after writing its checkpoint, or (``save``
    off) right away, so that a resume replays the steps since the last scheduled checkpoint."""

    def __init__(self, step: int, save: bool = True):
        self.step, self.save = step, save

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            if not self.save:
                os.kill(os.getpid(), signal.SIGKILL)
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
    parser.add_argument("--checkpoints", action="store_true", help="Save a checkpoint every --save-steps.")
    parser.add_argument("--save-steps", type=int, default=4)
    parser.add_argument("--no-save-at-kill", action="store_true", help="Kill without a checkpoint.")
    parser.add_argument("--schedule", default="sequential", help="task_schedule.")
    parser.add_argument(
        "--sgd", action="store_true", help="Plain SGD (lr 0.5): gradients reach the update 1:1."
    )
    parser.add_argument("--four-tasks", action="store_true", help="Train add1..add4.")
    parser.add_argument("--merge-method", default="metis")
    args = parser.parse_args()
    train, val = ({**TRAIN, **FOURTH_TRAIN}, {**VAL, **FOURTH_VAL}) if args.four_tasks else (TRAIN, VAL)
    parallel = args.schedule == "parallel"
    tokenizer = make_tokenizer()
    config = MetisConfig(
        output_dir=args.output_dir,
        num_rounds=2,
        local_steps=3,
        per_device_train_batch_size=2 * len(train) if parallel else 2,
        merge_method=args.merge_method,
        gradient_accumulation_steps=args.accum,
        task_schedule=args.schedule,
        **(dict(optim="sgd", learning_rate=0.5) if args.sgd else {}),
        max_length=64,
        use_cpu=True,
        seed=3,
        disable_tqdm=True,
        save_strategy="steps" if args.checkpoints or args.kill_at_step or args.resume else "no",
        save_steps=args.save_steps,
    )
    trainer = MetisTrainer(
        model=make_tiny_model(len(tokenizer), seed=0),
        args=config,
        train_dataset=train,
        eval_dataset=val,
        processing_class=tokenizer,
        peft_config=LoraConfig(**LORA),
        callbacks=[KillAt(args.kill_at_step, save=not args.no_save_at_kill)] if args.kill_at_step else None,
    )
    trainer.train(resume_from_checkpoint=True if args.resume else None)
    trainer.save_model(os.path.join(args.output_dir, "final"))
    if trainer.is_world_process_zero():
        with open(os.path.join(args.output_dir, "final", "log_history.json"), "w") as handle:
            json.dump(trainer.state.log_history, handle)
    # A gloo process group left to the interpreter's exit can abort the process (SIGABRT).
    trainer.end()
    # The threads still running (Linux names them): the test checks that no gloo thread outlived end().
    threads = [Path("/proc/self/task", t, "comm").read_text().strip() for t in os.listdir("/proc/self/task")]
    Path(args.output_dir, f"threads-after-end-{os.environ.get('RANK', '0')}.json").write_text(
        json.dumps(threads)
    )


if __name__ == "__main__":
    main()
