"""Whole-model tools: population statistics, folding, bias removal, freezing, conversion, inspection,
diagnosis.

Each module has one job; the public names are re-exported by ``batchnorm`` itself.
"""

from .accumulate import accumulate_statistics
from .conventions import KerasConversion, from_keras, from_keras_momentum, to_keras_momentum
from .convert import convert
from .doctor import CODES, Finding, Watch, diagnose, format_findings, watch
from .inspect import LayerReport, format_table, inspect_model
from .stats import LayerStatistics, Moments, recompute_statistics
from .surgery import FoldResult, RedundantBias, find_redundant_biases, fold, freeze, strip_redundant_bias, unfreeze

__all__ = [
    "CODES",
    "Finding",
    "FoldResult",
    "KerasConversion",
    "LayerReport",
    "LayerStatistics",
    "Moments",
    "RedundantBias",
    "Watch",
    "accumulate_statistics",
    "convert",
    "diagnose",
    "find_redundant_biases",
    "fold",
    "format_findings",
    "format_table",
    "freeze",
    "from_keras",
    "from_keras_momentum",
    "inspect_model",
    "recompute_statistics",
    "strip_redundant_bias",
    "to_keras_momentum",
    "unfreeze",
    "watch",
]
