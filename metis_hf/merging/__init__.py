"""Merge methods: pure tensor math over task vectors, one registry.

>>> from metis_hf.merging import merge, available_methods
>>> merged = merge("ties", [tau_a, tau_b], density=0.2)
"""

# Importing the method modules registers them.
from metis_hf.merging import consensus, dare, linear, robust, svd, ties  # noqa: F401
from metis_hf.merging.consensus import loss_gap_weights
from metis_hf.merging.registry import (
    MergeMethod,
    available_methods,
    get_merge_method,
    merge,
    register_merge_method,
)
from metis_hf.merging.robust import robust_weights

__all__ = [
    "MergeMethod",
    "available_methods",
    "get_merge_method",
    "loss_gap_weights",
    "merge",
    "register_merge_method",
    "robust_weights",
]
