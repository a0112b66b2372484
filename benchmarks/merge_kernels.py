"""Merge-kernel speed and memory: metis-hf against PEFT's merge_utils and mergekit's merge_tensors.

All runs share one process and the same task vectors (T float32 vectors of N entries). Time is the
best of --repeats; "extra MiB" is the peak resident memory during one merge beyond what was
resident before it (Linux: VmHWM reset through /proc/self/clear_refs), in units of one task vector.

    python benchmarks/merge_kernels.py --sizes 16777216 --tasks 4
    python benchmarks/merge_kernels.py --sizes 4194304 --under-load   # beside a busy process per core
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable

import torch

from metis_hf.merging import merge
from metis_hf.merging.dare import keep_masks


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def best_time(fn: Callable[[], torch.Tensor], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
        del out
    return best


def peak_extra_mib(fn: Callable[[], torch.Tensor]) -> float:
    """Peak resident MiB of one run beyond what was resident before it."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # reset the peak-RSS counter
    before = _rss_kib("VmRSS")
    out = fn()
    extra = (_rss_kib("VmHWM") - before) / 1024
    del out
    return extra


def peers(vectors: list[torch.Tensor]) -> dict[str, dict[str, Callable[[], torch.Tensor]]]:
    from mergekit.merge_methods import merge_tensors
    from peft.utils import merge_utils

    count = len(vectors)
    ones = torch.ones(count, device=vectors[0].device)
    base = torch.zeros_like(vectors[0])

    def mergekit(method: str, **params):
        return lambda: merge_tensors(
            [base, *vectors], method, parameters={"weight": 1.0, **params}, base_index=0
        )

    def seeded(fn):
        def run():
            torch.manual_seed(0)
            return fn()

        return run

    return {
        "task_arithmetic": {
            "metis-hf": lambda: merge("task_arithmetic", vectors),
            "peft": lambda: merge_utils.task_arithmetic(vectors, ones),
            "mergekit": mergekit("task_arithmetic"),
        },
        "ties": {
            "metis-hf": lambda: merge("ties", vectors, density=0.2),
            "peft": lambda: merge_utils.ties(vectors, ones, density=0.2),
            "mergekit": mergekit("ties", density=0.2),
        },
        "dare_linear": {
            "metis-hf": lambda: merge("dare_linear", vectors, density=0.5, seed=0),
            "peft": seeded(lambda: merge_utils.dare_linear(vectors, ones, density=0.5)),
            "mergekit": mergekit("dare_linear", density=0.5),
        },
        "dare_ties": {
            "metis-hf": lambda: merge("dare_ties", vectors, density=0.5, seed=0),
            "peft": seeded(lambda: merge_utils.dare_ties(vectors, ones, density=0.5)),
            "mergekit": mergekit("dare_ties", density=0.5),
        },
        # No peer has these; the peers' task arithmetic, a part of the same work, bounds theirs.
        "consensus_ta": {
            "metis-hf": lambda: merge("consensus_ta", vectors, delta=0.3, k=2),
            "peft (task_arithmetic)": lambda: merge_utils.task_arithmetic(vectors, ones),
            "mergekit (task_arithmetic)": mergekit("task_arithmetic"),
        },
        "metis": {
            "metis-hf": lambda: merge("metis", vectors, loss_gaps=[0.5 * i for i in range(count)]),
            "peft (task_arithmetic)": lambda: merge_utils.task_arithmetic(vectors, ones),
            "mergekit (task_arithmetic)": mergekit("task_arithmetic"),
        },
        "metis_robust": {
            "metis-hf": lambda: merge(
                "metis_robust",
                vectors,
                loss_gaps=[0.5 * i for i in range(count)],
                gap_normalization="standardized",
            )
        },
    }


def read_seconds(vectors: list[torch.Tensor]) -> float:
    """One pass over every input (a sum of each): the read-bandwidth limit of any merge. Cheap,
    so taken as the best of many runs: the share of it a merge reaches is then a lower bound."""
    return best_time(lambda: torch.stack([v.sum() for v in vectors]), 30)


def make_vectors(size: int, tasks: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(size, generator=generator) for _ in range(tasks)]


def memory_child(args: argparse.Namespace) -> None:
    """Runs in a child process whose allocator returns vector-sized buffers to the OS on free."""
    vectors = make_vectors(args.sizes[0], args.tasks)
    for method, runs in peers(vectors).items():
        if args.methods and method not in args.methods:
            continue
        for name, fn in runs.items():
            fn()  # warm: numba compiles (or loads its cache) on the first call
            print(json.dumps({"method": method, "impl": name, "extra_mib": peak_extra_mib(fn)}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[1 << 24])
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--peer-repeats", type=int, default=1, help="Peers are slow on CPU; one run each.")
    parser.add_argument("--methods", nargs="*", default=None)
    parser.add_argument(
        "--under-load",
        action="store_true",
        help="Time every merge while other processes keep every core busy (a training run beside it).",
    )
    parser.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        return memory_child(args)
    if args.under_load:
        with busy_cores():
            return timings(args)
    return timings(args)


@contextlib.contextmanager
def busy_cores():
    """One spinning process per core for the duration (the situation of a merge beside training)."""
    spinners = [
        subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 1)
    ]
    try:
        time.sleep(1.0)  # let the scheduler see them
        yield
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()


def timings(args: argparse.Namespace) -> None:
    load = f", {os.cpu_count()} busy processes beside it" if args.under_load else ""
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs{load}")
    for size in args.sizes:
        vectors = make_vectors(size, args.tasks)
        vector_mib = size * 4 / 2**20
        input_gb = args.tasks * size * 4 / 1e9
        limit = input_gb / read_seconds(vectors)
        # DARE must draw its masks from torch's CPU generator (to equal PEFT under a seed): a bound.
        masks = best_time(functools.partial(keep_masks, vectors, 0.5, 0), args.repeats)
        times = {}
        for method, runs in peers(vectors).items():
            if args.methods and method not in args.methods:
                continue
            for name, fn in runs.items():
                times[method, name] = best_time(fn, args.repeats if name == "metis-hf" else args.peer_repeats)
        del vectors
        # Glibc keeps freed buffers below its (dynamic) mmap threshold; a fixed 16 MiB threshold
        # in a child makes RSS follow live vector-sized buffers while chunk buffers stay cached.
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(16 << 20))
        command = [
            sys.executable,
            __file__,
            "--memory-child",
            "--sizes",
            str(size),
            "--tasks",
            str(args.tasks),
        ]
        command += ["--methods", *args.methods] if args.methods else []
        child = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
        memory = {
            (r["method"], r["impl"]): r["extra_mib"] for r in map(json.loads, child.stdout.splitlines())
        }
        print(f"\nT={args.tasks}, N={size} float32 ({vector_mib:.0f} MiB per task vector)")
        print(f"single-pass read of the inputs: {limit:.1f} GB/s; DARE's masks alone: {masks:.3f} s\n")
        print(
            "| method | implementation | seconds | input GB/s | share of read bandwidth "
            "| metis-hf speed-up | extra MiB | extra / one vector |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for (method, name), seconds in times.items():
            ours = times[method, "metis-hf"]
            speedup = "" if name == "metis-hf" else f"{seconds / ours:.1f}x"
            extra = memory[method, name]
            rate = input_gb / seconds
            print(
                f"| {method} | {name} | {seconds:.3f} | {rate:.1f} | {rate / limit:.0%} | {speedup} "
                f"| {extra:.0f} | {extra / vector_mib:.2f} |"
            )


if __name__ == "__main__":
    main()
