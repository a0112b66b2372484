"""Per-task validation loss: the loss METIS's gaps are made of (../shared/METIS.md §3 step 1).

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


@torch.no_grad()
def per_example_losses(
    model,
    tokenized: Dataset,
    batch_size: int = 16,
    completion_only: bool = False,
    fused: bool = False,
) -> torch.Tensor:
    """Mean token loss of each example of a tokenized dataset (``input_ids``, ``completion_mask``).

    ``fused=True`` asks a model patched by TRL's ``add_fused_lm_head`` (as SFTTrainer patches its
    model) for per-token log-probabilities without materialising the ``(batch, length, vocab)``
    logits: the computation training uses, at training's memory cost.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    losses = []
    try:
        for start in range(0, len(tokenized), batch_size):
            batch = tokenized[start : start + batch_size]
            ids = _pad(batch["input_ids"], 0).to(device)
            attention = _pad([[1] * len(r) for r in batch["input_ids"]], 0).to(device)
            trained = attention if not completion_only else _pad(batch["completion_mask"], 0).to(device)
            if fused:
                labels = ids.masked_fill(trained == 0, -100)
                out = model(input_ids=ids, attention_mask=attention, labels=labels, fused_lm_head=True)
                sums, counts = -out.log_probs.float().sum(1), out.label_mask.float().sum(1)
            else:
                logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1].float()
                weights = trained[:, 1:].float()
                token_loss = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
                sums, counts = (token_loss * weights).sum(1), weights.sum(1)
            losses.append((sums / counts.clamp(min=1)).cpu())
    finally:
        model.train(was_training)
    return torch.cat(losses)


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
    tokenized = tokenize_dataset(tokenizer, dataset, max_length, name=name)
    return float(per_example_losses(model, tokenized, batch_size, completion_only).mean())


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
