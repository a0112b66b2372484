"""Task-parallel rounds against one process and against DDP, on a recipe (default: the offline T = 4).

Three trainings of the same recipe (no evaluation), one after another on an otherwise idle machine:

* one process with 2 threads, the sequential schedule;
* 2 processes with 1 thread each (torchrun, gloo), task_parallel: each trains 2 of the 4 tasks;
* 2 processes with 1 thread each, the sequential schedule under DDP (every step all-reduced).

Reported: the wall time of ``trainer.train()`` (rank 0), the optimizer steps each process ran, and
the bytes the collectives carried, counted from their own buffers: DDP's gradient buckets through
a communication hook (``DistributedDataParallel.register_comm_hook``) and the task adapters'
broadcast (``merge/exchanged_bytes`` in rounds.jsonl).

    python benchmarks/task_parallel.py                                  # the offline default, 3 rounds
    python benchmarks/task_parallel.py --set training.num_rounds=1      # one round of each
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RUNS = (
    ("1 process x 2 threads, sequential", 1, 2, "sequential"),
    ("2 processes x 1 thread, task_parallel", 2, 1, "task_parallel"),
    ("2 processes x 1 thread, sequential (DDP)", 2, 1, "sequential"),
)


def child(args: argparse.Namespace) -> None:
    import torch
    from transformers import TrainerCallback

    from metis_hf.data import build_tasks
    from metis_hf.models import load_model_and_tokenizer
    from metis_hf.recipe import load_recipe, metis_config_from_recipe
    from metis_hf.workflows.train import trainer_from_recipe

    recipe = load_recipe(args.recipe, [*args.set, f"training.task_schedule={args.schedule}"])
    config = metis_config_from_recipe(recipe, args.output_dir, disable_tqdm=True, logging_steps=10**6)
    tasks = build_tasks(recipe.tasks)
    model, tokenizer = load_model_and_tokenizer(recipe.model)
    counted = {"bytes": 0, "calls": 0}

    class CountAllReduce(TrainerCallback):
        """Counts what DDP's gradient all-reduce sends (bucket by bucket) before sending it."""

        def on_train_begin(self, *_, **__):
            wrapped = trainer.model_wrapped
            if isinstance(wrapped, torch.nn.parallel.DistributedDataParallel):

                def hook(state, bucket):
                    counted["bytes"] += bucket.buffer().numel() * bucket.buffer().element_size()
                    counted["calls"] += 1
                    work = torch.distributed.all_reduce(bucket.buffer(), async_op=True).get_future()
                    return work.then(lambda fut: fut.value()[0] / torch.distributed.get_world_size())

                wrapped.register_comm_hook(None, hook)

    trainer = trainer_from_recipe(recipe, config, tasks, model, tokenizer, callbacks=[CountAllReduce()])
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    if trainer.is_world_process_zero():
        exchanged = [r.get("merge/exchanged_bytes") or 0 for r in trainer.round_records]
        Path(args.result).write_text(
            json.dumps(
                {
                    "seconds": seconds,
                    "steps": trainer.state.global_step,
                    "rounds": len(trainer.round_records),
                    "allreduce_bytes": counted["bytes"],
                    "allreduce_calls": counted["calls"],
                    "exchanged_bytes": sum(exchanged),
                    "multitask_loss": trainer.round_records[-1].get("merge/multitask_loss"),
                }
            )
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--recipe", default=None, help="Recipe file (default: the offline default).")
    parser.add_argument("--set", action="append", default=[], help="Recipe override, as metis-hf's --set.")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--schedule", default="sequential", help=argparse.SUPPRESS)
    parser.add_argument("--output-dir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    rows = []
    with tempfile.TemporaryDirectory() as root:
        for label, processes, threads, schedule in RUNS:
            result = Path(root) / f"{processes}-{schedule}.json"
            extra = ["--recipe", args.recipe] if args.recipe else []
            for override in args.set:
                extra += ["--set", override]
            script = [
                __file__,
                "--child",
                "--schedule",
                schedule,
                "--output-dir",
                str(Path(root) / f"run-{processes}-{schedule}"),
                "--result",
                str(result),
                *extra,
            ]
            if processes == 1:
                command = [sys.executable, *script]
            else:
                with socket.socket() as probe:
                    probe.bind(("127.0.0.1", 0))
                    port = probe.getsockname()[1]
                command = [
                    sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes),
                    "--master-addr", "127.0.0.1", "--master-port", str(port), *script,
                ]  # fmt: skip
            env = dict(os.environ, OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1")
            run = subprocess.run(command, env=env, capture_output=True, text=True)
            if run.returncode:
                raise RuntimeError(f"{label} failed:\n{run.stderr[-4000:]}")
            rows.append({"run": label, **json.loads(result.read_text())})
    print(
        "\n| run | train seconds | steps per process | all-reduce MiB (calls) | adapters exchanged MiB | multi-task loss |"
    )
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['run']} | {row['seconds']:.0f} | {row['steps']} | "
            f"{row['allreduce_bytes'] / 2**20:.1f} ({row['allreduce_calls']}) | "
            f"{row['exchanged_bytes'] / 2**20:.1f} | {row['multitask_loss']:.4f} |"
        )


if __name__ == "__main__":
    main()
