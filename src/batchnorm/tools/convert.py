"""``convert``: swap torch's BatchNorm*d for ours in a model, or back, keeping the state."""

from __future__ import annotations

import copy
from collections.abc import Callable

from torch import nn

from ..nn.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d

__all__ = ["convert", "replace_modules"]

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
        src = getattr(bn, name, None)  # torch's layers lack our num_batches_skipped
        if src is not None:
            t.data = t.data.to(src.dtype)
    new.load_state_dict(bn.state_dict(), strict=True)
    for name, p in new.named_parameters(recurse=False):
        p.requires_grad_(getattr(bn, name).requires_grad)
    new.train(bn.training)
    return new


def replace_modules(root: nn.Module, make: Callable[[nn.Module], nn.Module | None]) -> nn.Module:
    """Replace, in place, every submodule ``m`` of ``root`` for which ``make(m)`` is a module.

    ``make`` is called once per module *object*: a module registered under several names
    (``nn.Sequential(bn, act, bn)``, or under two parents) becomes ONE new module registered
    under all of them, so shared state stays shared. Returns the new root (``make(root)`` if
    that is a module, else ``root``). ``named_children`` cannot be used for this: it yields a
    module registered twice in one parent only once.
    """
    made: dict[int, nn.Module | None] = {}

    def new_for(m: nn.Module) -> nn.Module | None:
        if id(m) not in made:
            made[id(m)] = make(m)
        return made[id(m)]

    top = new_for(root)
    if top is not None:
        return top
    for parent in list(root.modules()):  # listed first: new modules are not visited
        for name, child in list(parent._modules.items()):
            if child is not None:
                new = new_for(child)
                if new is not None:
                    setattr(parent, name, new)
    return root


def convert(model: nn.Module, to: str = "batchnorm", *, inplace: bool = False) -> nn.Module:
    """Return ``model`` with every ``torch.nn.BatchNorm1d/2d/3d`` replaced by ours (``to="batchnorm"``),
    or ours replaced by torch's (``to="torch"``).

    Parameters, buffers (running statistics, ``num_batches_tracked``), dtype, device, train/eval
    mode and ``requires_grad`` are kept, so outputs are unchanged. Only these exact classes are
    swapped: subclasses may change behaviour, so they are left alone. A batch norm registered
    under several names stays one (shared) module. A new model is returned unless
    ``inplace=True``; a module passed directly is swapped too.
    """
    if to not in ("batchnorm", "torch"):
        raise ValueError(f"convert: expected to='batchnorm' or to='torch', got {to!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert: expected an nn.Module, got {type(model).__name__}")
    table = _TO_OURS if to == "batchnorm" else _TO_TORCH
    root = model if inplace else copy.deepcopy(model)
    return replace_modules(root, lambda m: _swap(m, table[type(m)]) if type(m) in table else None)
