"""One tokenization for training and for loss-gap validation, so the gap measures the trained loss.

A prompt-completion example becomes ``prompt_ids + completion_ids + [eos]`` (cut at
``max_length``) with a ``completion_mask`` marking the completion and EOS tokens. Training on all
tokens (the METIS reference) ignores the mask; completion-only training uses it, and so must the gap.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from datasets import Dataset


def tokenize_example(tokenizer, prompt: str, completion: str, max_length: int = 512) -> dict[str, list[int]]:
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        completion_ids = completion_ids + [tokenizer.eos_token_id]
    input_ids = (prompt_ids + completion_ids)[:max_length]
    mask = ([0] * len(prompt_ids) + [1] * len(completion_ids))[:max_length]
    return {"input_ids": input_ids, "completion_mask": mask}


def tokenize_dataset(tokenizer, dataset: Dataset, max_length: int = 512, name: str = "dataset") -> Dataset:
    """Map a prompt/completion dataset to ``input_ids`` and ``completion_mask`` columns."""
    missing = [c for c in ("prompt", "completion") if c not in dataset.column_names]
    if missing:
        raise ValueError(f"{name}: column {missing[0]!r} is missing (have {dataset.column_names}).")
    if len(dataset) == 0:
        raise ValueError(f"{name} is empty.")

    def encode(row: Mapping[str, Any]) -> dict[str, list[int]]:
        return tokenize_example(tokenizer, row["prompt"], row["completion"], max_length)

    return dataset.map(encode, remove_columns=dataset.column_names, desc=f"tokenizing {name}")
