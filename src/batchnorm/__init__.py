"""batchnorm: exact, fast and understandable batch normalization for PyTorch.

    y = gamma * (x - mean) / sqrt(var + eps) + beta

Conventions (as PyTorch): momentum is the weight of the *new* batch statistic
(``running = (1 - momentum) * running + momentum * batch``, default 0.1); ``running_var`` stores
the *unbiased* variance; eps sits inside the square root.
"""

from .conventions import KerasConversion, from_keras, from_keras_momentum, to_keras_momentum
from .convert import convert
from .functional import batch_norm
from .nn import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    BatchNormBase,
    FrozenBatchNorm1d,
    FrozenBatchNorm2d,
    FrozenBatchNorm3d,
    FrozenBatchNormBase,
)
from ._kernels.dispatch import get_backend, set_backend, use_backend
from .stats import LayerStatistics, Moments, recompute_statistics
from .surgery import FoldResult, RedundantBias, find_redundant_biases, fold, freeze, strip_redundant_bias, unfreeze

__version__ = "0.1.0"

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchNormBase",
    "FoldResult",
    "FrozenBatchNorm1d",
    "FrozenBatchNorm2d",
    "FrozenBatchNorm3d",
    "FrozenBatchNormBase",
    "KerasConversion",
    "LayerStatistics",
    "Moments",
    "RedundantBias",
    "batch_norm",
    "convert",
    "find_redundant_biases",
    "fold",
    "freeze",
    "from_keras",
    "from_keras_momentum",
    "get_backend",
    "recompute_statistics",
    "set_backend",
    "strip_redundant_bias",
    "to_keras_momentum",
    "unfreeze",
    "use_backend",
]
