"""Round updates folded into the base model's weights (``merge_round_updates`` in the core space).

Each round every task adapter starts from zero (B = 0, A at the run's initialisation), so what
it holds at the round's end is exactly that round's update ``scaling * B_t @ A_t``. The updates
are merged in the core space at full rank (T x r: nothing is truncated), the merged update is
added to the base weights, and every adapter starts again from zero. The run's result is the sum
of the rounds' merged updates: kept as low-rank factors, one block per round, and saved as one
LoRA adapter whose rank is the blocks' total.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from metis_hf.merging.task_vectors import lora_pairs, merge_lora_states

Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]  # module prefix -> (B, A), update = B @ A
FOLDED_FILE = "metis_folded.safetensors"


def merged_round_update(
    method: str,
    states: Sequence[Mapping[str, torch.Tensor]],
    scaling: float,
    names: Sequence[str],
    **params,
) -> Factors:
    """The merged update of the task adapters' ``states``, exactly (rank: the ranks' sum)."""
    rank = sum(
        next(iter(state[a] for a in state if a.endswith(".lora_A.weight"))).shape[0] for state in states
    )
    merged, _ = merge_lora_states(
        method,
        states,
        space="core",
        rank=rank,
        scaling=scaling,
        names=names,
        output_scaling=1.0,
        dtype=torch.float32,
        **params,
    )
    return {prefix: (merged[b], merged[a]) for prefix, (a, b) in lora_pairs(merged).items()}


@torch.no_grad()
def fold(model: torch.nn.Module, factors: Factors, factor: float) -> None:
    """``W += factor * B @ A`` for each adapted module's base weight (a PEFT LoRA layer's)."""
    if factor == 0:
        return
    for prefix, (b, a) in factors.items():
        weight = model.get_submodule(prefix).base_layer.weight
        weight.add_((factor * (b @ a)).to(device=weight.device, dtype=weight.dtype))


def stacked_adapter(rounds: Sequence[Factors]) -> tuple[dict[str, torch.Tensor], int]:
    """One LoRA state (scaling 1) whose update is the sum of every round's, and its rank."""
    state = {}
    for prefix in rounds[0]:
        state[prefix + ".lora_B.weight"] = torch.cat([r[prefix][0] for r in rounds], dim=1).contiguous()
        state[prefix + ".lora_A.weight"] = torch.cat([r[prefix][1] for r in rounds], dim=0).contiguous()
    return dict(sorted(state.items())), sum(r[next(iter(r))][1].shape[0] for r in rounds)


def to_tensors(rounds: Sequence[Factors]) -> dict[str, torch.Tensor]:
    """The rounds' factors as flat safetensors entries (``<round>/<prefix>/B`` and ``/A``)."""
    return {
        f"{i}/{prefix}/{side}": tensor.contiguous()
        for i, factors in enumerate(rounds)
        for prefix, pair in factors.items()
        for side, tensor in zip("BA", pair)
    }


def from_tensors(tensors: Mapping[str, torch.Tensor]) -> list[Factors]:
    rounds: dict[int, dict[str, dict[str, torch.Tensor]]] = {}
    for key, tensor in tensors.items():
        index, prefix, side = key.split("/")
        rounds.setdefault(int(index), {}).setdefault(prefix, {})[side] = tensor
    return [{prefix: (pair["B"], pair["A"]) for prefix, pair in rounds[i].items()} for i in sorted(rounds)]
