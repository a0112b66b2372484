"""metis-hf: many-shot model merging (METIS) for LoRA fine-tunes in the Hugging Face ecosystem."""

__version__ = "0.1.0"
