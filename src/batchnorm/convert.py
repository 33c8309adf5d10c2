"""``convert``: swap torch's BatchNorm*d for ours in a model, or back, keeping the state."""

from __future__ import annotations

import copy


from torch import nn

from .nn.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d

__all__ = ["convert"]

_TO_OURS: dict[type[nn.Module], type[nn.Module]] = {
    nn.BatchNorm1d: BatchNorm1d,
    nn.BatchNorm2d: BatchNorm2d,
    nn.BatchNorm3d: BatchNorm3d,
}
_TO_TORCH = {ours: theirs for theirs, ours in _TO_OURS.items()}


def _swap(bn: nn.Module, cls: type[nn.Module]) -> nn.Module:
    """A ``cls`` with ``bn``'s hyper-parameters, state, device, dtype, mode and requires_grad."""
    new = cls(
        bn.num_features,
        eps=bn.eps,
        momentum=bn.momentum,
        affine=bn.affine,
        track_running_stats=bn.track_running_stats,
    )
    if bn.affine and bn.bias is None:
        new.register_parameter("bias", None)
    ref = next(iter(bn.state_dict().values()), None)
    if ref is not None:
        new = new.to(device=ref.device)
    # dtype per tensor: load_state_dict copies values but keeps the new tensors' dtypes
    for name, t in list(new.named_parameters(recurse=False)) + list(new.named_buffers(recurse=False)):
        src = getattr(bn, name)
        if src is not None:
            t.data = t.data.to(src.dtype)
    new.load_state_dict(bn.state_dict(), strict=True)
    for name, p in new.named_parameters(recurse=False):
        p.requires_grad_(getattr(bn, name).requires_grad)
    new.train(bn.training)
    return new


def convert(model: nn.Module, to: str = "batchnorm", *, inplace: bool = False) -> nn.Module:
    """Return ``model`` with every ``torch.nn.BatchNorm1d/2d/3d`` replaced by ours (``to="batchnorm"``),
    or ours replaced by torch's (``to="torch"``).

    Parameters, buffers (running statistics, ``num_batches_tracked``), dtype, device, train/eval
    mode and ``requires_grad`` are kept, so outputs are unchanged. Only these exact classes are
    swapped: subclasses may change behaviour, so they are left alone. A new model is returned
    unless ``inplace=True``; a module passed directly is swapped too.
    """
    if to not in ("batchnorm", "torch"):
        raise ValueError(f"convert: expected to='batchnorm' or to='torch', got {to!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert: expected an nn.Module, got {type(model).__name__}")
    table = _TO_OURS if to == "batchnorm" else _TO_TORCH
    root = model if inplace else copy.deepcopy(model)
    if type(root) in table:
        return _swap(root, table[type(root)])
    for parent in list(root.modules()):
        for name, child in list(parent.named_children()):
            if type(child) in table:
                setattr(parent, name, _swap(child, table[type(child)]))
    return root


