"""batchnorm: exact, fast and understandable batch normalization for PyTorch.

    y = gamma * (x - mean) / sqrt(var + eps) + beta

Conventions (as PyTorch): momentum is the weight of the *new* batch statistic
(``running = (1 - momentum) * running + momentum * batch``, default 0.1); ``running_var`` stores
the *unbiased* variance; eps sits inside the square root.
"""

from ._checks import ShapeError
from ._kernels.dispatch import get_backend, set_backend, use_backend
from .distributed.convert import convert_sync_batchnorm
from .functional import batch_norm
from .functional_act import batch_norm_act
from .nn import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    BatchNormAct1d,
    BatchNormAct2d,
    BatchNormAct3d,
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
from .tools import (
    Finding,
    FoldResult,
    KerasConversion,
    LayerStatistics,
    Moments,
    RedundantBias,
    accumulate_statistics,
    convert,
    diagnose,
    find_redundant_biases,
    fold,
    freeze,
    from_keras,
    from_keras_momentum,
    recompute_statistics,
    strip_redundant_bias,
    to_keras_momentum,
    unfreeze,
    watch,
)

__version__ = "0.1.0"

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchNormAct1d",
    "BatchNormAct2d",
    "BatchNormAct3d",
    "BatchNormBase",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "Finding",
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
    "ShapeError",
    "SyncBatchNorm",
    "accumulate_statistics",
    "batch_norm",
    "batch_norm_act",
    "batch_renorm",
    "convert",
    "convert_sync_batchnorm",
    "diagnose",
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
    "watch",
]
