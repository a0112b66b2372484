"""How much of a merged LoRA adapter survives METIS's consensus mask as the task count grows.

Takes real expert adapters (the task adapters `metis-hf compare` saves under
runs/seed*/experts/adapter/task_adapters/) and merges the first T of them, T = 2 .. all, with the
paper's `metis` and with `metis_robust`, at uniform weights and at the skewed weights the pilot
saw (one task at 0.79). Reports the fraction of coordinates kept and the merged norm relative to
the weighted sum without a mask.

    python scripts/mask_collapse.py outputs/compare-cpu
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from safetensors.torch import load_file

from metis_hf.merging import merge


def flat(path: Path) -> torch.Tensor:
    state = load_file(path)
    return torch.cat([state[k].float().reshape(-1) for k in sorted(state)])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("compare_dir", type=Path)
    args = parser.parse_args()
    files = sorted(
        args.compare_dir.glob("runs/seed*/experts/adapter/task_adapters/*/adapter_model.safetensors")
    )
    if len(files) < 2:
        raise SystemExit(f"need at least two expert adapters under {args.compare_dir}/runs/seed*/experts")
    vectors = [flat(f) for f in files]
    print(f"{len(vectors)} expert adapters of {vectors[0].numel():,} LoRA parameters each")
    print("| T | weights | metis kept | metis norm | metis_robust kept | metis_robust norm |")
    print("|---|---|---|---|---|---|")
    for count in range(2, len(vectors) + 1):
        taus = vectors[:count]
        skewed = [0.79] + [0.21 / (count - 1)] * (count - 1)
        for label, alphas in (("uniform", [1 / count] * count), ("skewed 0.79", skewed)):
            reference = sum(a * t for a, t in zip(alphas, taus)).norm()
            cells = []
            for method in ("metis", "metis_robust"):
                out = merge(method, taus, alphas=alphas)
                cells += [f"{float((out != 0).float().mean()):.3f}", f"{float(out.norm() / reference):.3f}"]
            print(f"| {count} | {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
