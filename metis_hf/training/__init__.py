"""Many-shot merging with TRL: MetisConfig and MetisTrainer."""

from metis_hf.training.config import MetisConfig
from metis_hf.training.trainer import MetisTrainer

__all__ = ["MetisConfig", "MetisTrainer"]
