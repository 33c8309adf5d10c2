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
    BatchRenorm1d,
    BatchRenorm2d,
    BatchRenorm3d,
    GhostBatchNorm1d,
    GhostBatchNorm2d,
    GhostBatchNorm3d,
    SyncBatchNorm,
    batch_renorm,
    ghost_batch_norm,
    renorm_limits,
    sync_batch_norm,
)
from .distributed import convert_sync_batchnorm
from ._kernels.dispatch import get_backend, set_backend, use_backend

__version__ = "0.1.0"

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchNormBase",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "GhostBatchNorm3d",
    "KerasConversion",
    "SyncBatchNorm",
    "batch_norm",
    "batch_renorm",
    "convert",
    "convert_sync_batchnorm",
    "from_keras",
    "from_keras_momentum",
    "get_backend",
    "ghost_batch_norm",
    "renorm_limits",
    "set_backend",
    "sync_batch_norm",
    "to_keras_momentum",
    "use_backend",
]
