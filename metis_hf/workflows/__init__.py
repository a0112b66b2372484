"""What the commands run, as library functions with typed arguments: a recipe trained and scored
(``run_training``), the compare grid (``run_compare``), adapters or checkpoints merged from files
(``run_merge``)."""
