"""Modules: batch-norm layers (re-exported from :mod:`batchnorm`)."""

from .batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d, BatchNormBase

__all__ = ["BatchNormBase", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d"]
