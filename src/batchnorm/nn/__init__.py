"""Modules: batch-norm layers (re-exported from `batchnorm`)."""

from . import _script  # noqa: F401  (registers each layer's step as an operator, for TorchScript)
from .act import BatchNormAct1d, BatchNormAct2d, BatchNormAct3d, BatchNormActBase
from .batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d, BatchNormBase
from .frozen import FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d, FrozenBatchNormBase
from .ghost import GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d, GhostBatchNormBase, ghost_batch_norm
from .renorm import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d, BatchRenormBase, batch_renorm, renorm_limits
from .sync import SyncBatchNorm, sync_batch_norm

__all__ = [
    "BatchNormBase",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchNormActBase",
    "BatchNormAct1d",
    "BatchNormAct2d",
    "BatchNormAct3d",
    "BatchRenormBase",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "FrozenBatchNormBase",
    "FrozenBatchNorm1d",
    "FrozenBatchNorm2d",
    "FrozenBatchNorm3d",
    "GhostBatchNormBase",
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "GhostBatchNorm3d",
    "SyncBatchNorm",
    "batch_renorm",
    "ghost_batch_norm",
    "renorm_limits",
    "sync_batch_norm",
]
