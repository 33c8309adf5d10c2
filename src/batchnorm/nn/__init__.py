"""Modules: batch-norm layers (re-exported from :mod:`batchnorm`)."""

from .batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d, BatchNormBase
from .frozen import FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d, FrozenBatchNormBase

__all__ = [
    "BatchNormBase",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "FrozenBatchNormBase",
    "FrozenBatchNorm1d",
    "FrozenBatchNorm2d",
    "FrozenBatchNorm3d",
]
