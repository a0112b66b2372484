"""The core space against the dense one for LoRA merges: time, peak memory and agreement.

SmolLM2-135M-sized adapters (30 layers; q/k/v/o 576 x 576 or 192 x 576, gate/up 1536 x 576,
down 576 x 1536), rank r, random factors, T tasks. Each method merges them in the dense space (the
T dense updates of every module, FusionBench's way of running the SVD methods) and in the core
space, both back to rank r (``merge_lora_states``). Time is the best of --repeats; "peak MiB" is
the resident memory during one merge beyond what was resident before it (the script runs itself
with glibc's mmap threshold fixed at 64 KiB, so that freed tensors leave the resident set and a
merge's allocations are not hidden by heap memory an earlier one left behind); "max diff" is the largest
difference of the merged updates relative to their largest entry. Both return the exact merge (a
rank-T*r adapter): a rank-r truncation of a near-flat spectrum (Iso-C's is flat; random factors
give near-equal singular values) is ill-posed, and its float-level choices are not a difference
between the spaces.

    python benchmarks/core_space.py --tasks 4 8 --rank 16
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time

import torch
from merge_kernels import peak_extra_mib

from metis_hf.merging.task_vectors import lora_to_dense, merge_lora_states

SHAPES = {  # SmolLM2-135M: hidden 576, 3 KV heads of 64, MLP 1536
    "q_proj": (576, 576),
    "k_proj": (192, 576),
    "v_proj": (192, 576),
    "o_proj": (576, 576),
    "gate_proj": (1536, 576),
    "up_proj": (1536, 576),
    "down_proj": (576, 1536),
}


def adapters(count: int, rank: int, layers: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    states = []
    for _ in range(count):
        state = {}
        for layer in range(layers):
            for name, (out_features, in_features) in SHAPES.items():
                prefix = f"model.layers.{layer}.{name}"
                state[prefix + ".lora_A.weight"] = torch.randn(rank, in_features, generator=generator) / 24
                state[prefix + ".lora_B.weight"] = torch.randn(out_features, rank, generator=generator) / 24
        states.append(state)
    return states


def _merge(method: str, states, space: str, rank: int) -> dict[str, torch.Tensor]:
    return merge_lora_states(method, states, space=space, rank=rank, scaling=2.0)[0]


def main() -> None:
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") != "65536":
        os.execve(
            sys.executable, [sys.executable, *sys.argv], {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        )
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tasks", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--methods", nargs="+", default=["task_arithmetic", "iso_c", "tsv_m"])
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.layers} layers, r={args.rank}"
    )
    print("| T | method | dense s | core s | speed-up | dense peak MiB | core peak MiB | max diff |")
    print("|---|---|---|---|---|---|---|---|")
    for count in args.tasks:
        states = adapters(count, args.rank, args.layers)
        for method in args.methods:
            rank = count * args.rank  # the exact merge: truncating a near-flat spectrum is ill-posed
            results, seconds, peaks = {}, {}, {}
            for space in ("dense", "core"):
                run = functools.partial(_merge, method, states, space, rank)
                best = float("inf")
                for _ in range(args.repeats):
                    start = time.perf_counter()
                    results[space] = run()
                    best = min(best, time.perf_counter() - start)
                seconds[space] = best
                peaks[space] = peak_extra_mib(run)
            dense = lora_to_dense(results["dense"], 2.0)
            core = lora_to_dense(results["core"], 2.0)
            diff = max(float((core[k] - d).abs().max() / d.abs().max()) for k, d in dense.items())
            print(
                f"| {count} | {method} | {seconds['dense']:.2f} | {seconds['core']:.2f} | "
                f"{seconds['dense'] / seconds['core']:.1f}x | {peaks['dense']:.0f} | {peaks['core']:.0f} | "
                f"{diff:.1e} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
