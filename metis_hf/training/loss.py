"""Per-task validation loss: the loss METIS's gaps are made of (docs/method.md §3 step 1).

Causal-LM cross-entropy over the trained tokens of each example (all tokens, or completion tokens
only), averaged per example, then averaged over the examples. Batched, padding masked.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from datasets import Dataset

from metis_hf.tokenization import tokenize_dataset


def _pad(rows: Sequence[Sequence[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([list(r) + [value] * (width - len(r)) for r in rows])


TOKEN_SETS = ("all", "completion")


@torch.no_grad()
def per_example_losses_on(
    model,
    tokenized: Dataset,
    token_sets: Sequence[str],
    batch_size: int = 16,
    fused: bool = False,
) -> list[torch.Tensor]:
    """Mean token loss of each example, for each of ``token_sets`` ("all" tokens or the
    "completion" tokens), from one forward per batch: asking for both costs one pass, not two.

    ``tokenized`` has ``input_ids`` and ``completion_mask``. ``fused=True`` asks a model patched by
    TRL's ``add_fused_lm_head`` (as SFTTrainer patches its model) for per-token log-probabilities
    without materialising the ``(batch, length, vocab)`` logits: the computation training uses, at
    training's memory cost.
    """
    unknown = [name for name in token_sets if name not in TOKEN_SETS]
    if unknown or not token_sets:
        raise ValueError(f"token_sets must be a non-empty subset of {TOKEN_SETS}, got {list(token_sets)}.")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    losses: list[list[torch.Tensor]] = [[] for _ in token_sets]
    try:
        for start in range(0, len(tokenized), batch_size):
            batch = tokenized[start : start + batch_size]
            ids = _pad(batch["input_ids"], 0).to(device)
            attention = _pad([[1] * len(r) for r in batch["input_ids"]], 0).to(device)
            masks = {"all": attention}
            if "completion" in token_sets:
                masks["completion"] = _pad(batch["completion_mask"], 0).to(device)
            # Token j's loss predicts ids[j + 1]: every mask is read from position 1 on.
            weights = [masks[name][:, 1:].float() for name in token_sets]
            if fused:
                # Score only the tokens some set asks for: the completion alone skips the prompt's head.
                needed = masks["all"] if "all" in token_sets else masks["completion"]
                labels = ids.masked_fill(needed == 0, -100)
                out = model(input_ids=ids, attention_mask=attention, labels=labels, fused_lm_head=True)
                token_loss = -out.log_probs.float()
            else:
                logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1].float()
                token_loss = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
            for collected, weight in zip(losses, weights):
                collected.append(((token_loss * weight).sum(1) / weight.sum(1).clamp(min=1)).cpu())
    finally:
        model.train(was_training)
    return [torch.cat(collected) for collected in losses]


def per_example_losses(
    model,
    tokenized: Dataset,
    batch_size: int = 16,
    completion_only: bool = False,
    fused: bool = False,
) -> torch.Tensor:
    """Mean token loss of each example on its trained tokens (all, or the completion only)."""
    token_set = "completion" if completion_only else "all"
    return per_example_losses_on(model, tokenized, (token_set,), batch_size, fused)[0]


def task_losses(
    model,
    tokenizer,
    dataset: Dataset,
    batch_size: int = 16,
    max_length: int = 512,
    token_sets: Sequence[str] = ("all",),
    name: str = "validation set",
) -> dict[str, float]:
    """Validation loss of ``model`` (with whatever adapter is active) on a prompt/completion
    dataset, for each of ``token_sets``, from one forward per batch."""
    tokenized = tokenize_dataset(tokenizer, dataset, max_length, name=name)
    per_set = per_example_losses_on(model, tokenized, token_sets, batch_size)
    return {token_set: float(losses.mean()) for token_set, losses in zip(token_sets, per_set)}


def task_loss(
    model,
    tokenizer,
    dataset: Dataset,
    batch_size: int = 16,
    max_length: int = 512,
    completion_only: bool = False,
    name: str = "validation set",
) -> float:
    """Validation loss of ``model`` (with whatever adapter is active) on a prompt/completion dataset."""
    token_set = "completion" if completion_only else "all"
    return task_losses(model, tokenizer, dataset, batch_size, max_length, (token_set,), name)[token_set]


def compute_loss_gaps(
    model,
    tokenizer,
    validation: Mapping[str, Dataset],
    adapters: Mapping[str, str],
    reference_adapter: str | None = None,
    **loss_kwargs,
) -> dict[str, float]:
    """METIS loss gaps for finished adapters: ``loss(reference on V_t) - loss(adapter_t on V_t)``.

    ``model`` is a PeftModel holding every task's adapter (``adapters`` maps task -> adapter name).
    The reference is another adapter (for instance the previous merge) or, when None, the base
    model with adapters disabled, which is G_0 of many-shot merging.
    """
    if set(validation) != set(adapters):
        raise ValueError(f"Tasks differ: validation has {sorted(validation)}, adapters {sorted(adapters)}.")
    gaps = {}
    for task, data in validation.items():
        if reference_adapter is None:
            with model.disable_adapter():
                reference = task_loss(model, tokenizer, data, name=f"{task} validation", **loss_kwargs)
        else:
            model.set_adapter(reference_adapter)
            reference = task_loss(model, tokenizer, data, name=f"{task} validation", **loss_kwargs)
        model.set_adapter(adapters[task])
        gaps[task] = reference - task_loss(model, tokenizer, data, name=f"{task} validation", **loss_kwargs)
    return gaps
