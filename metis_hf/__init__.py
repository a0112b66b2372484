"""metis-hf: many-shot model merging (METIS) for LoRA fine-tunes in the Hugging Face ecosystem."""

from typing import TYPE_CHECKING

__version__ = "0.1.0"
__all__ = ["MetisConfig", "MetisTrainer", "merge", "available_methods", "register_merge_method"]

if TYPE_CHECKING:
    from metis_hf.merging import available_methods, merge, register_merge_method
    from metis_hf.training import MetisConfig, MetisTrainer


def __getattr__(name: str):
    # Lazy: `import metis_hf` stays fast; TRL and transformers load only when the trainer is used.
    if name in ("MetisConfig", "MetisTrainer"):
        from metis_hf import training

        return getattr(training, name)
    if name in ("merge", "available_methods", "register_merge_method"):
        from metis_hf import merging

        return getattr(merging, name)
    raise AttributeError(f"module 'metis_hf' has no attribute {name!r}")
