"""Full-checkpoint merges end to end: `metis-hf merge` against `mergekit-yaml`, same YAML, same files.

Inputs: SmolLM2-135M-Instruct (the offline model, float32) as the base and two "fine-tuned" copies
(base + Gaussian noise at 1% of each tensor's standard deviation, seeded), all written as sharded
safetensors (--shard-mb per shard). Each tool runs as its own process under /usr/bin/time: wall
seconds (best of --repeats) and peak resident memory (max RSS). The outputs of task_arithmetic and
ties are compared tensor by tensor: the entries that differ, and how many of them sit exactly at a
TIES threshold tie (a task-vector entry whose magnitude equals the k-th largest: metis-hf keeps
every tied entry, mergekit's top-k keeps exactly k). DARE draws its random masks differently in
each tool, so its outputs are not compared.

    python benchmarks/checkpoint_merge.py --repeats 2
    python benchmarks/checkpoint_merge.py --shard-mb 50 --methods ties
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml
from safetensors import safe_open

BIN = Path(sys.executable).parent
METHODS = {
    "task_arithmetic": {},
    "ties": {"density": 0.3},
    "dare_ties": {"density": 0.5},
}
COMPARED = ("task_arithmetic", "ties")


def read_folder(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            tensors.update({key: handle.get_tensor(key) for key in handle.keys()})
    return tensors


def write_inputs(root: Path, shard_mb: int) -> dict[str, Path]:
    """base, ft1, ft2 as sharded safetensors folders (config and tokenizer copied)."""
    from huggingface_hub import save_torch_state_dict

    from metis_hf.models import ensure_builtin_converted

    source = ensure_builtin_converted("smollm2-135m-instruct")
    base = read_folder(source)
    folders = {}
    generator = torch.Generator().manual_seed(0)
    for name in ("base", "ft1", "ft2"):
        folder = root / name
        folder.mkdir(parents=True)
        for extra in source.iterdir():
            if extra.suffix != ".safetensors":
                shutil.copy(extra, folder / extra.name)
        state = base
        if name != "base":
            state = {
                key: value + 0.01 * value.std() * torch.randn(value.shape, generator=generator)
                if value.numel() > 1
                else value.clone()
                for key, value in base.items()
            }
        save_torch_state_dict(state, folder, max_shard_size=f"{shard_mb}MB")
        folders[name] = folder
    return folders


def differences(outputs: dict[str, Path], folders: dict[str, Path], density: float | None) -> dict:
    """Entries where the two tools' outputs differ, and how many of them are TIES threshold ties."""
    ours, theirs = read_folder(outputs["metis-hf"]), read_folder(outputs["mergekit"])
    inputs = {name: read_folder(folders[name]) for name in ("base", "ft1", "ft2")}
    if set(ours) != set(theirs):
        raise RuntimeError(f"the outputs hold different tensors: {sorted(set(ours) ^ set(theirs))[:5]}")
    differing = tied = total = 0
    for key in ours:
        different = (ours[key] - theirs[key]).abs() > 1e-6
        total += different.numel()
        differing += int(different.sum())
        if density is None or not different.any():
            continue
        at_tie = torch.zeros_like(different)
        for name in ("ft1", "ft2"):
            magnitude = (inputs[name][key] - inputs["base"][key]).abs().flatten()
            kth = magnitude.topk(max(1, int(density * magnitude.numel()))).values[-1]
            at_tie |= (magnitude == kth).view_as(different)
        tied += int((different & at_tie).sum())
    return {"differing_entries": differing, "at_threshold_ties": tied, "entries": total}


def timed(command: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of one process."""
    report = Path(tempfile.mkstemp()[1])
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    run = subprocess.run(
        ["/usr/bin/time", "-o", str(report), "-f", "%e %M", *command], env=env, capture_output=True, text=True
    )
    if run.returncode:
        raise RuntimeError(f"{command[0]} failed:\n{run.stderr[-3000:]}")
    seconds, kib = report.read_text().split()[-2:]
    report.unlink()
    return float(seconds), int(kib) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--shard-mb", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--root", default=None, help="Work folder (default: a temporary one, removed).")
    parser.add_argument("--json", default=None, help="Also write the rows here.")
    args = parser.parse_args()

    root = Path(args.root or tempfile.mkdtemp(prefix="ckpt-merge-"))
    folders = write_inputs(root / "inputs", args.shard_mb)
    input_mib = sum(p.stat().st_size for f in folders.values() for p in f.glob("*.safetensors")) / 2**20
    largest_mib = max(t.numel() * t.element_size() for t in read_folder(folders["base"]).values()) / 2**20
    print(
        f"torch {torch.__version__}, {os.cpu_count()} CPUs; inputs: 3 checkpoints, {input_mib:.0f} MiB in "
        f"all, shards of {args.shard_mb} MB, largest tensor {largest_mib:.0f} MiB"
    )
    rows = []
    for method in args.methods:
        config = {
            "merge_method": method,
            "base_model": str(folders["base"]),
            "models": [{"model": str(folders[n]), "parameters": {"weight": 1.0}} for n in ("ft1", "ft2")],
            "parameters": METHODS[method],
            "dtype": "float32",
        }
        config_path = root / f"{method}.yaml"
        config_path.write_text(yaml.safe_dump(config))
        outputs = {}
        for tool, command in (
            ("metis-hf", [str(BIN / "metis-hf"), "merge", str(config_path)]),
            ("mergekit", [str(BIN / "mergekit-yaml"), str(config_path), "--quiet", "--random-seed", "0"]),
        ):
            out = root / f"{method}-{tool}"
            best_seconds, peak = float("inf"), 0.0
            for _ in range(args.repeats):
                shutil.rmtree(out, ignore_errors=True)
                seconds, mib = timed([*command, str(out)])
                best_seconds, peak = min(best_seconds, seconds), max(peak, mib)
            outputs[tool] = out
            rows.append({"method": method, "tool": tool, "seconds": best_seconds, "peak_rss_mib": peak})
        if method in COMPARED:
            rows[-1].update(differences(outputs, folders, METHODS[method].get("density")))
        for out in outputs.values():
            shutil.rmtree(out, ignore_errors=True)
    print("\n| method | tool | seconds | metis-hf speed-up | peak RSS MiB | peak / inputs | outputs |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        ours = next(r for r in rows if r["method"] == row["method"] and r["tool"] == "metis-hf")
        speedup = "" if row["tool"] == "metis-hf" else f"{row['seconds'] / ours['seconds']:.1f}x"
        equal = ""
        if "differing_entries" in row:
            equal = f"{row['differing_entries']} of {row['entries']} entries differ"
            if row["differing_entries"]:
                equal += f", {row['at_threshold_ties']} of them at threshold ties"
        print(
            f"| {row['method']} | {row['tool']} | {row['seconds']:.1f} | {speedup} | {row['peak_rss_mib']:.0f} "
            f"| {row['peak_rss_mib'] / input_mib:.2f} | {equal} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"input_mib": input_mib, "rows": rows}, indent=2))
    if not args.root:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
