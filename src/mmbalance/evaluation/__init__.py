"""Metrics, modality contributions and evaluation passes."""

from .evaluate import EvalView, evaluate
from .metrics import Metric, SumMetric, accuracy, macro_f1
from .shapley import all_coalitions, imbalance_ratio, shapley_values

__all__ = [
    "EvalView", "Metric", "SumMetric", "accuracy", "all_coalitions", "evaluate",
    "imbalance_ratio", "macro_f1", "shapley_values",
]
