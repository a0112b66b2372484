"""The LoRA configuration a run starts from, and what a run needs of one."""

from __future__ import annotations

import math

from peft import LoraConfig


def default_lora_config() -> LoraConfig:
    """The reference's LoRA: r 16, alpha 16, no dropout, no bias, attention projections."""
    return LoraConfig(
        r=16,
        lora_alpha=16,
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
    )


def check_lora_config(config: LoraConfig, where: str = "peft_config") -> None:
    """What a LoRA config must hold for a run: a positive integer rank, a positive finite alpha, a
    dropout in [0, 1), and only LoRA factors to train (no DoRA magnitudes or full-weight copies)."""
    r, alpha, dropout = config.r, config.lora_alpha, config.lora_dropout
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"{where}.r must be an integer >= 1, got {r!r}.")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < math.inf:
        raise ValueError(f"{where}.lora_alpha must be a positive number, got {alpha!r}.")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ValueError(f"{where}.lora_dropout must be in [0, 1), got {dropout!r}.")
    for option in ("use_dora", "modules_to_save", "trainable_token_indices"):
        if getattr(config, option, None):
            raise ValueError(
                f"{where}.{option} is not supported: its tensors are not LoRA factors, and "
                "MetisTrainer merges LoRA A and B only (they would never be merged)."
            )
