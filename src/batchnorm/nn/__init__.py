"""Modules: batch-norm layers (re-exported from :mod:`batchnorm`)."""

from .act import BatchNormAct1d, BatchNormAct2d, BatchNormAct3d, BatchNormActBase
from .batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d, BatchNormBase

__all__ = [
    "BatchNormBase",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchNormActBase",
    "BatchNormAct1d",
    "BatchNormAct2d",
    "BatchNormAct3d",
]
