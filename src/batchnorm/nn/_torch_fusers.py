"""Our ``BatchNorm1d/2d/3d`` in torch's eager-mode fusion table, so that
``torch.ao.quantization.fuse_modules`` and ``fuse_modules_qat`` fuse them as they fuse torch's.

torch finds a fuser by the *exact* types of the listed modules (``(Conv2d, BatchNorm2d, ReLU)``
→ ``fuse_conv_bn_relu``), so a subclass is "not found" unless the table names it. `register`
adds, for every entry that names one of torch's ``BatchNorm1d/2d/3d``, the same entry with ours
in its place. Its fuser hands torch's fuser a ``torch.nn.BatchNorm*d`` with our layer's state
(same parameters, buffers, mode and ``requires_grad``): the fused result is what fusing torch's
layer gives, bit for bit. Folding for inference (``fuse_modules`` on eval modules) reads only
the running statistics, ``weight``, ``bias`` and ``eps``, which both layers share; quantization
aware training (``fuse_modules_qat``) builds torch's ``ConvBn*d``/``BNReLU*d`` modules, which
carry torch's batch norm from then on, as they do for torch's layer.

Registered when the first of our layers is built or unpickled (never at import); idempotent, and
a torch without the table is left alone (then ``fuse_modules`` says "did not find fuser method"
as before).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

__all__ = ["register"]

_registered = False


def _with_torch_layers(fuser: Callable[..., Any], ours: dict[type, type]) -> Callable[..., Any]:
    """``fuser`` called with each of our layers replaced by torch's layer with the same state."""

    def fuse(is_qat: bool, *mods: nn.Module) -> Any:
        from ..tools.convert import _swap  # tools import the layers: import at the call

        return fuser(is_qat, *(_swap(m, ours[type(m)]) if type(m) in ours else m for m in mods))

    fuse.__doc__ = f"{getattr(fuser, '__name__', 'fuser')} with our BatchNorm*d passed as torch's"
    return fuse


def register() -> None:
    """Add our ``BatchNorm1d/2d/3d`` to torch's eager fusion table (once)."""
    global _registered
    if _registered:
        return
    _registered = True
    from torch.ao.quantization import fuser_method_mappings

    from .batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d

    table = getattr(fuser_method_mappings, "_DEFAULT_OP_LIST_TO_FUSER_METHOD", None)
    if not isinstance(table, dict):
        return
    to_ours: dict[type, type] = {nn.BatchNorm1d: BatchNorm1d, nn.BatchNorm2d: BatchNorm2d, nn.BatchNorm3d: BatchNorm3d}
    to_torch = {o: t for t, o in to_ours.items()}
    for key, fuser in list(table.items()):
        if isinstance(key, tuple) and any(t in to_ours for t in key) and callable(fuser):
            table.setdefault(tuple(to_ours.get(t, t) for t in key), _with_torch_layers(fuser, to_torch))
