"""Shared fixtures: a tiny Llama built from a config and a tokenizer trained here in milliseconds."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

CORPUS = [
    "What is 2 + 3?\nAnswer: 5\n\n",
    "Spell this word backward: cat\nAnswer: tac\n\n",
    "The quick brown fox jumps over the lazy dog.",
    "Find the GCD of 12 and 18.\nAnswer: 6\n\n",
    "0 1 2 3 4 5 6 7 8 9 + - * / = ? ! , . : ;",
]


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<unk>", "<pad>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>"
    )


def make_tiny_model(vocab_size: int, seed: int = 0, hidden: int = 32, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=1,
        eos_token_id=2,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


def write_tiny_recipe(tmp_path, tokenizer, tasks=("chain_sum", "gcd"), training=None, **sections):
    """A recipe over a tiny local Llama (saved under tmp_path) and small reasoning-gym tasks."""
    import yaml

    model_dir = tmp_path / "tiny"
    if not model_dir.is_dir():
        make_tiny_model(len(tokenizer)).save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
    recipe = {
        "model": str(model_dir),
        "seed": 1,
        "tasks": [{"name": n, "train_size": 16, "validation_size": 4, "test_size": 4} for n in tasks],
        "evaluation": {"batch_size": 4, "max_new_tokens": 3},
        "lora": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        "training": {
            "num_rounds": 2,
            "local_steps": 2,
            "use_cpu": True,
            "max_length": 96,
            **(training or {}),
        },
        **sections,
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return make_tokenizer()


@pytest.fixture
def tiny_model(tiny_tokenizer):
    return make_tiny_model(len(tiny_tokenizer))
