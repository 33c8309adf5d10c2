"""Whole-model helpers for distributed training: ``convert_sync_batchnorm``.

    model = batchnorm.convert_sync_batchnorm(model)          # a converted copy
    model = torch.nn.parallel.DistributedDataParallel(model)  # gloo (CPU) or nccl (GPU)

See [`SyncBatchNorm`][batchnorm.SyncBatchNorm] for what is synchronized and what it costs.
"""

from __future__ import annotations

import copy

from torch import nn

from ..nn.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from ..nn.sync import SyncBatchNorm
from ..tools.convert import _swap, replace_modules

__all__ = ["convert_sync_batchnorm"]

#: The exact classes that are converted. Subclasses (ghost, frozen, renorm-like variants,
#: other libraries' layers) change what the statistics mean, so they are left alone.
CONVERTIBLE: tuple[type[nn.Module], ...] = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    SyncBatchNorm,
)


def _to_sync(bn: nn.Module, process_group: object | None) -> SyncBatchNorm:
    new = _swap(bn, SyncBatchNorm)
    new.process_group = process_group
    return new  # type: ignore[return-value]


def convert_sync_batchnorm(
    model: nn.Module, process_group: object | None = None, *, inplace: bool = False
) -> nn.Module:
    """Return ``model`` with every batch norm replaced by [`SyncBatchNorm`][batchnorm.SyncBatchNorm].

    Converted: ``torch.nn.BatchNorm1d/2d/3d``, ``torch.nn.SyncBatchNorm`` and our
    ``BatchNorm1d/2d/3d``/``SyncBatchNorm`` (exact classes, see ``CONVERTIBLE``). Parameters,
    buffers (running statistics, ``num_batches_tracked``), dtype, device, train/eval mode and
    ``requires_grad`` are kept, so the converted model computes the same thing on one process.
    ``process_group`` (None: the whole world) is set on every converted layer. A new model is
    returned unless ``inplace=True``; a batch norm passed directly is converted too.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert_sync_batchnorm: expected an nn.Module, got {type(model).__name__}")
    root = model if inplace else copy.deepcopy(model)
    return replace_modules(root, lambda m: _to_sync(m, process_group) if type(m) in CONVERTIBLE else None)
