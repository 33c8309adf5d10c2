"""batchnorm: exact, fast and understandable batch normalization for PyTorch.

    y = gamma * (x - mean) / sqrt(var + eps) + beta

Conventions (as PyTorch): momentum is the weight of the *new* batch statistic
(``running = (1 - momentum) * running + momentum * batch``, default 0.1); ``running_var`` stores
the *unbiased* variance; eps sits inside the square root.
"""

from ._kernels.dispatch import get_backend, set_backend, use_backend
from .conventions import KerasConversion, from_keras, from_keras_momentum, to_keras_momentum
from .convert import convert
from .distributed import convert_sync_batchnorm
from .functional import batch_norm
from .nn import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    BatchNormBase,
    BatchRenorm1d,
    BatchRenorm2d,
    BatchRenorm3d,
    FrozenBatchNorm1d,
    FrozenBatchNorm2d,
    FrozenBatchNorm3d,
    FrozenBatchNormBase,
    GhostBatchNorm1d,
    GhostBatchNorm2d,
    GhostBatchNorm3d,
    SyncBatchNorm,
    batch_renorm,
    ghost_batch_norm,
    renorm_limits,
    sync_batch_norm,
)
from .stats import LayerStatistics, Moments, recompute_statistics
from .surgery import FoldResult, RedundantBias, find_redundant_biases, fold, freeze, strip_redundant_bias, unfreeze

__version__ = "0.1.0"

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchNormBase",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "FoldResult",
    "FrozenBatchNorm1d",
    "FrozenBatchNorm2d",
    "FrozenBatchNorm3d",
    "FrozenBatchNormBase",
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "GhostBatchNorm3d",
    "KerasConversion",
    "LayerStatistics",
    "Moments",
    "RedundantBias",
    "SyncBatchNorm",
    "batch_norm",
    "batch_renorm",
    "convert",
    "convert_sync_batchnorm",
    "find_redundant_biases",
    "fold",
    "freeze",
    "from_keras",
    "from_keras_momentum",
    "get_backend",
    "ghost_batch_norm",
    "recompute_statistics",
    "renorm_limits",
    "set_backend",
    "strip_redundant_bias",
    "sync_batch_norm",
    "to_keras_momentum",
    "unfreeze",
    "use_backend",
]
