"""How large each post-hoc merge of trained LoRA experts is, and how much of each expert it carries.

Reads the experts of a `metis-hf compare` output (runs/seed<S>/experts/adapter/task_adapters), merges
them with each method in the LoRA-factor space at the settings compare gives a post-hoc merge, and
reports, over all modules' dense updates (scaling * B @ A):

* size: ||merged|| / ||mean of the experts' updates||;
* per task, the share of the expert's own update the merge carries: <merged, D_t> / ||D_t||^2
  (1/T for the plain average of mutually orthogonal updates; 1 for the expert itself).

    python scripts/merged_update_size.py outputs/compare-answer-tokens --seed 0
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

from metis_hf import MetisConfig
from metis_hf.merging.task_vectors import lora_scaling, lora_to_dense, merge_lora_states
from metis_hf.training.rounds import merge_parameters

METHODS = ["task_arithmetic", "ties", "consensus_ta", "dare_linear", "dare_ties"]


def flat_dense(state: dict[str, torch.Tensor], scaling: float) -> torch.Tensor:
    dense = lora_to_dense(state, scaling)
    return torch.cat([dense[k].flatten() for k in sorted(dense)])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("compare_dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", nargs="+", default=METHODS)
    args = parser.parse_args()

    root = Path(args.compare_dir) / "runs" / f"seed{args.seed}" / "experts" / "adapter" / "task_adapters"
    tasks = sorted(p.name for p in root.iterdir() if (p / "adapter_model.safetensors").is_file())
    if not tasks:
        raise SystemExit(f"no expert adapters under {root}")
    states = [load_file(root / t / "adapter_model.safetensors") for t in tasks]
    config = json.loads((root / tasks[0] / "adapter_config.json").read_text())
    scaling = lora_scaling(config["r"], config["lora_alpha"], config.get("use_rslora", False))
    experts = [flat_dense(s, scaling) for s in states]
    mean = torch.stack(experts).mean(0)

    print(f"| method | size vs the experts' mean | {' | '.join(tasks)} |")
    print(f"|---|---|{'---|' * len(tasks)}")
    rows = {"experts' mean": mean}
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods:
            config_args = MetisConfig(output_dir=tmp, merge_method=method, use_cpu=True, seed=args.seed)
            params, _ = merge_parameters(config_args, method, tasks, 0, None)
            merged, _ = merge_lora_states(method, states, "lora", names=tasks, **params)
            rows[method] = flat_dense(merged, scaling)
    for name, update in rows.items():
        carried = [float(update @ d / (d @ d)) for d in experts]
        size = float(update.norm() / mean.norm())
        print(f"| {name} | {size:.2f} | {' | '.join(f'{c:.3f}' for c in carried)} |")


if __name__ == "__main__":
    main()
