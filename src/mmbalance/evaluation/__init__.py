"""Metrics, modality contributions and evaluation passes."""

from .metrics import Outputs, accuracy, collect_outputs, compute_metrics, macro_f1
from .shapley import all_coalitions, imbalance_ratio, shapley_values

__all__ = [
    "Outputs", "accuracy", "all_coalitions", "collect_outputs", "compute_metrics",
    "imbalance_ratio", "macro_f1", "shapley_values",
]
