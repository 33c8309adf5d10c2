"""Whole-model tools: population statistics, folding, bias removal, freezing, conversion, inspection.

Each module has one job; the public names are re-exported by :mod:`batchnorm` itself.
"""

from .accumulate import accumulate_statistics
from .conventions import KerasConversion, from_keras, from_keras_momentum, to_keras_momentum
from .convert import convert
from .inspect import LayerReport, format_table, inspect_model
from .stats import LayerStatistics, Moments, recompute_statistics
from .surgery import FoldResult, RedundantBias, find_redundant_biases, fold, freeze, strip_redundant_bias, unfreeze

__all__ = [
    "FoldResult",
    "KerasConversion",
    "LayerReport",
    "LayerStatistics",
    "Moments",
    "RedundantBias",
    "accumulate_statistics",
    "convert",
    "find_redundant_biases",
    "fold",
    "format_table",
    "freeze",
    "from_keras",
    "from_keras_momentum",
    "inspect_model",
    "recompute_statistics",
    "strip_redundant_bias",
    "to_keras_momentum",
    "unfreeze",
]
