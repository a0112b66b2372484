"""Many-shot merging with TRL: MetisConfig and MetisTrainer."""

from typing import TYPE_CHECKING

__all__ = ["MetisConfig", "MetisTrainer"]

if TYPE_CHECKING:
    from metis_hf.training.config import MetisConfig
    from metis_hf.training.trainer import MetisTrainer


def __getattr__(name: str):
    # Lazy: a recipe's configs (MetisConfig) load without the trainer.
    if name == "MetisConfig":
        from metis_hf.training.config import MetisConfig

        return MetisConfig
    if name == "MetisTrainer":
        from metis_hf.training.trainer import MetisTrainer

        return MetisTrainer
    raise AttributeError(f"module 'metis_hf.training' has no attribute {name!r}")
