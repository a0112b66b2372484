"""Task vectors in two spaces, and merged results written back.

* **LoRA-parameter space** (the paper's and the reference code's): a task vector is the adapter's
  ``lora_A`` and ``lora_B`` entries, keyed as in PEFT's saved state dict, in sorted key order.
* **Dense delta space**: per adapted module ``scaling * B @ A`` (the change the adapter makes to
  the weight); for full checkpoints ``fine-tuned - base``, which ``metis-hf merge`` computes key by
  key while streaming (``metis_hf/workflows/merge.py``).

A dense merged delta returns to a rank-r adapter by truncated SVD (``dense_to_lora``), which keeps
the best rank-r approximation in Frobenius norm and reports what it drops; or it is folded into the
base weights exactly (``apply_dense_deltas``).

This module touches models only through their parameters and state dicts: no Trainer, no Hub.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from metis_hf.merging.checks import check_task_vectors
from metis_hf.merging.registry import get_merge_method

StateDict = dict[str, torch.Tensor]
_LORA_KEY = re.compile(r"\.lora_(A|B)\.(?P<adapter>[^.]+)\.weight$")


def lora_parameters(model: torch.nn.Module, adapter_name: str = "default") -> dict[str, torch.nn.Parameter]:
    """The adapter's LoRA parameters (the live ``Parameter`` objects), keyed without the adapter
    name as PEFT saves them, in sorted order."""
    found = {}
    for name, param in model.named_parameters():
        match = _LORA_KEY.search(name)
        if match and match.group("adapter") == adapter_name:
            found[name.replace(f".{adapter_name}.weight", ".weight")] = param
    if not found:
        raise ValueError(f"Model has no LoRA parameters for adapter {adapter_name!r}.")
    return dict(sorted(found.items()))


def lora_state(model: torch.nn.Module, adapter_name: str = "default") -> StateDict:
    """A detached copy of the adapter's LoRA parameters (a task vector in LoRA-parameter space)."""
    return {k: p.detach().clone() for k, p in lora_parameters(model, adapter_name).items()}


@torch.no_grad()
def load_lora_state(
    model: torch.nn.Module, state: Mapping[str, torch.Tensor], adapter_name: str = "default"
) -> None:
    """Write ``state`` into the adapter in place: the Parameter objects keep their identity, so an
    optimizer that holds them stays valid."""
    params = lora_parameters(model, adapter_name)
    check_same_keys([dict(params), dict(state)], names=[f"adapter {adapter_name!r}", "merged state"])
    for key, param in params.items():
        if param.shape != state[key].shape:
            raise ValueError(
                f"Tensor {key!r}: adapter has shape {tuple(param.shape)}, state {tuple(state[key].shape)}."
            )
        param.copy_(state[key])


def check_same_keys(
    states: Sequence[Mapping[str, torch.Tensor]], names: Sequence[str] | None = None
) -> list[str]:
    """The common key list of several state dicts; an error names the first key one of them lacks."""
    names = list(names or [f"input {i}" for i in range(len(states))])
    if not states:
        raise ValueError("No inputs to merge.")
    keys = list(states[0])
    reference = set(keys)
    for name, state in zip(names[1:], states[1:]):
        missing, extra = sorted(reference - set(state)), sorted(set(state) - reference)
        if missing or extra:
            culprit = f"lacks {missing[0]!r}" if missing else f"has extra tensor {extra[0]!r}"
            raise ValueError(
                f"{name} {culprit} compared with {names[0]} (different target modules or layers?)."
            )
    return keys


_LORA_FACTOR = re.compile(r"\.lora_(A|B)\.weight$|\.lora_embedding_(A|B)$")


def check_lora_factors(
    states: Sequence[Mapping[str, torch.Tensor]], names: Sequence[str] | None = None
) -> None:
    """Refuse adapter tensors that are not LoRA factors: a ``modules_to_save`` copy is a full weight
    and a DoRA ``lora_magnitude_vector`` a per-row norm; merging either elementwise like a factor
    (TIES trimming, consensus masks) would corrupt it."""
    names = list(names or [f"input {i}" for i in range(len(states))])
    for name, state in zip(names, states):
        for key in state:
            if not _LORA_FACTOR.search(key):
                kind = "a DoRA magnitude" if "lora_magnitude_vector" in key else "not a LoRA factor"
                raise ValueError(
                    f"{name}: tensor {key!r} is {kind} (modules_to_save or DoRA?). metis-hf merges "
                    "plain LoRA adapters only (lora_A/lora_B); train without modules_to_save and use_dora."
                )


def merge_state_dicts(
    method: str,
    states: Sequence[Mapping[str, torch.Tensor]],
    granularity: str = "tensor",
    names: Sequence[str] | None = None,
    **params,
) -> StateDict:
    """Merge task vectors given as state dicts, key by key.

    ``granularity="tensor"`` merges each tensor on its own (PEFT's and mergekit's convention; it
    matters only for TIES's per-tensor trimming, every other method is elementwise);
    ``"global"`` merges the concatenation of all tensors once. A DARE ``seed`` is offset by the
    key's index so that every tensor draws its own mask reproducibly.
    """
    keys = check_same_keys(states, names)
    merge_fn = get_merge_method(method)
    for key in keys:
        check_task_vectors([s[key] for s in states], name=key)
    if granularity == "global" and merge_fn.operates_on == "matrices":
        raise ValueError(f"granularity 'global': {method} merges each layer's matrix on its own ('tensor').")
    if granularity == "global":
        flat = [torch.cat([s[k].reshape(-1) for k in keys]) for s in states]
        merged, out, offset = merge_fn(flat, **params), {}, 0
        for key in keys:
            n = states[0][key].numel()
            out[key] = merged[offset : offset + n].view_as(states[0][key]).clone()
            offset += n
        return out
    if granularity != "tensor":
        raise ValueError(f"granularity must be 'tensor' or 'global', got {granularity!r}.")
    out = {}
    seed = params.pop("seed", None)
    for index, key in enumerate(keys):
        out[key] = merge_fn([s[key] for s in states], **params, **key_seed(seed, index))
    return out


def key_seed(seed: int | Sequence[int] | None, index: int) -> dict[str, Any]:
    """The ``seed`` parameter for the ``index``-th tensor of a key-by-key merge: offset by the key's
    index, so that every tensor draws its own DARE mask reproducibly (none when unseeded)."""
    if seed is None:
        return {}
    return {"seed": seed + index if isinstance(seed, int) else [s + index for s in seed]}


def lora_scaling(rank: int, lora_alpha: float, use_rslora: bool = False) -> float:
    """PEFT's LoRA scaling: the dense delta is ``scaling * B @ A``."""
    return lora_alpha / (math.sqrt(rank) if use_rslora else rank)


def lora_config_at_rank(config: Mapping[str, Any], rank: int) -> dict[str, Any]:
    """A copy of a PEFT adapter config at rank ``rank`` with the same scaling (its ``lora_alpha``
    rescaled): the config of a merge whose output rank differs from its inputs'."""
    out = dict(config)
    if rank != config["r"]:
        rslora = config.get("use_rslora", False)
        scaling = lora_scaling(config["r"], config["lora_alpha"], rslora)
        out.update(r=rank, lora_alpha=scaling * (math.sqrt(rank) if rslora else rank))
    return out


# --- dense delta space -----------------------------------------------------------------------


def lora_pairs(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[str, str]]:
    """Module prefix -> (A key, B key) for a LoRA state dict."""
    pairs = {}
    for key in state:
        if key.endswith(".lora_A.weight"):
            prefix = key.removesuffix(".lora_A.weight")
            b_key = prefix + ".lora_B.weight"
            if b_key not in state:
                raise ValueError(f"LoRA tensor {key!r} has no matching {b_key!r}.")
            pairs[prefix] = (key, b_key)
    if not pairs:
        raise ValueError("No lora_A/lora_B pairs found in the state dict.")
    return pairs


def lora_to_dense(state: Mapping[str, torch.Tensor], scaling: float) -> StateDict:
    """Module prefix -> ``scaling * B @ A`` (float32)."""
    return {
        prefix: scaling * (state[b].float() @ state[a].float())
        for prefix, (a, b) in lora_pairs(state).items()
    }


@dataclass
class TruncationReport:
    """What truncating dense deltas back to rank r dropped, per module and overall."""

    relative_error: dict[str, float]  # ||delta - delta_r||_F / ||delta||_F per module
    overall: float  # the same over all modules together


def dense_to_lora(
    dense: Mapping[str, torch.Tensor], rank: int, scaling: float, dtype: torch.dtype = torch.float32
) -> tuple[StateDict, TruncationReport]:
    """Best rank-``rank`` factors of each dense delta (truncated SVD), split evenly between A and B:
    ``B = U_r sqrt(S_r / scaling)``, ``A = sqrt(S_r / scaling) V_r^T``, so ``scaling * B @ A`` is
    the truncation."""
    out: StateDict = {}
    errors, dropped_total, norm_total = {}, 0.0, 0.0
    for prefix, delta in dense.items():
        u, s, vh = torch.linalg.svd(delta.float(), full_matrices=False)
        root = torch.sqrt(s[:rank] / scaling)
        out[prefix + ".lora_A.weight"] = (root[:, None] * vh[:rank]).to(dtype)
        out[prefix + ".lora_B.weight"] = (u[:, :rank] * root[None, :]).to(dtype)
        dropped, norm = float((s[rank:] ** 2).sum()), float((s**2).sum())
        errors[prefix] = (dropped / norm) ** 0.5 if norm > 0 else 0.0
        dropped_total, norm_total = dropped_total + dropped, norm_total + norm
    overall = (dropped_total / norm_total) ** 0.5 if norm_total > 0 else 0.0
    return dict(sorted(out.items())), TruncationReport(errors, overall)


@torch.no_grad()
def apply_dense_deltas(model: torch.nn.Module, deltas: Mapping[str, torch.Tensor], prefix_map=None) -> None:
    """Fold dense deltas into a base model's weights in place (``W += delta``); exact, no rank limit.

    ``deltas`` keys are module prefixes (as from :func:`lora_to_dense`) or parameter names.
    ``prefix_map`` maps a delta key to the model's parameter name when they differ.
    """
    params = dict(model.named_parameters())
    for key, delta in deltas.items():
        name = prefix_map(key) if prefix_map else key
        if name not in params and name + ".weight" in params:
            name += ".weight"
        if name not in params:
            raise ValueError(f"Delta {key!r} names no parameter of the model (looked for {name!r}).")
        if params[name].shape != delta.shape:
            raise ValueError(
                f"Delta {key!r} has shape {tuple(delta.shape)}, parameter {tuple(params[name].shape)}."
            )
        params[name].add_(delta.to(params[name].dtype))


MERGE_SPACES = ("lora", "dense", "core")


def check_space(space: str) -> str:
    """``lora``, ``dense`` or ``core``; ``delta``, the dense space's former name (easily read as
    METIS's mask threshold), is accepted with a FutureWarning."""
    if space == "delta":
        warnings.warn("merge space 'delta' is now called 'dense'.", FutureWarning, stacklevel=3)
        return "dense"
    if space not in MERGE_SPACES:
        raise ValueError(f"merge space must be one of {MERGE_SPACES}, got {space!r}.")
    return space


def check_method_space(method: str, space: str) -> None:
    """A method on layer matrices (Iso-C, TSV-M...) cannot merge LoRA's A and B apart."""
    if get_merge_method(method).operates_on == "matrices" and check_space(space) == "lora":
        raise ValueError(
            f"{method} merges each layer's update matrix: merge LoRA adapters in the 'core' space "
            "(exact and fast) or the 'dense' one, not 'lora'."
        )


def merge_lora_states(
    method: str,
    states: Sequence[Mapping[str, torch.Tensor]],
    space: str = "lora",
    rank: int | None = None,
    scaling: float | Sequence[float] = 1.0,
    names: Sequence[str] | None = None,
    granularity: str = "tensor",
    dtype: torch.dtype | None = None,
    output_scaling: float | None = None,
    **params: Any,
) -> tuple[StateDict, float | None]:
    """Merge LoRA adapters' states with ``method`` in one of three spaces:

    * ``"lora"``: A and B merged apart (the reference code's way);
    * ``"dense"``: each module's ``scaling * B @ A`` merged, then back to rank ``rank`` by SVD;
    * ``"core"``: the same update matrices in the bases their factors span (see
      :mod:`metis_hf.merging.core_space`), exact for the dense results of rotation-invariant
      methods and cheap; adapters may have different ranks.

    ``scaling``: the adapters' LoRA scaling, one for all or one each; the output's is
    ``output_scaling`` (default: the first adapter's), its factors in ``dtype`` (default: the
    states'). Returns the merged LoRA state and, for the dense and core spaces, the relative
    truncation error."""
    check_lora_factors(states, names)
    space = check_space(space)
    check_method_space(method, space)
    if space == "lora":
        return merge_state_dicts(method, states, granularity=granularity, names=names, **params), None
    if rank is None:
        raise ValueError(f"merging in the {space} space needs the output adapter's rank.")
    check_same_keys(states, names)
    scalings = [float(scaling)] * len(states) if isinstance(scaling, (int, float)) else list(scaling)
    if len(scalings) != len(states):
        raise ValueError(f"scaling has {len(scalings)} entries for {len(states)} adapters.")
    output_scaling = scalings[0] if output_scaling is None else output_scaling
    dtype = dtype or next(iter(states[0].values())).dtype
    if space == "core":
        from metis_hf.merging.core_space import lora_cores, merge_in_core

        if granularity != "tensor":
            raise ValueError("granularity: the core space merges module by module ('tensor').")
        cores = lora_cores(states, scalings, lora_pairs(states[0]))
        return merge_in_core(
            method, cores, rank, output_scaling, dtype, seed=params.pop("seed", None), **params
        )
    dense = [lora_to_dense(state, s) for state, s in zip(states, scalings)]
    merged_dense = merge_state_dicts(method, dense, granularity=granularity, names=names, **params)
    merged, report = dense_to_lora(merged_dense, rank, output_scaling, dtype=dtype)
    return merged, report.overall
