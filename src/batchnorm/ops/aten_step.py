"""The eager BatchNorm*d step on aten's kernels with our guard on top (private).

`train_aten` / `eval_aten` are what `batchnorm.ops.bn.train_step` and `eval_forward` try first
on the eager path for small CPU inputs (`batchnorm._kernels.dispatch.aten_direct`): aten's
kernel and aten's C++ autograd, with the running-statistics update undone for a batch that is
not finite and the step declined where aten's precision is not enough. The step has two
forms with one contract (written in ``batchnorm/_kernels/step_ext.cpp``): the compiled one
(`batchnorm._kernels.step_ext`, one C++ call, when built) and `aten_step_py`, its Python form.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .._kernels import native, step_ext
from .._kernels.dispatch import host_kernels
from .update import _HOST, _warn_skipped

__all__ = ["ILL_CONDITIONED", "NOT_FINITE", "OK", "UNSUPPORTED", "aten_step_py", "eval_aten", "train_aten", "EXT"]

_c = torch._C
EXT: dict[str, Any] = {}
"""The compiled eager step (`batchnorm._kernels.step_ext`), or None, looked up once."""


OK, ILL_CONDITIONED, NOT_FINITE, UNSUPPORTED = 0, 1, 2, -1
"""The codes of the eager aten step (`aten_step_py` and the compiled ``step_ext``)."""


def aten_step_py(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    num_batches_tracked: Tensor | None,
    momentum: float,
    eps: float,
    kappa_max: float,
    update: bool,
) -> tuple[Tensor | None, Tensor | None, Tensor | None, int]:
    """The Python form of the compiled step (`batchnorm._kernels.step_ext`; the contract, codes
    included, is written in ``step_ext.cpp``): aten's training kernel, the batch statistics
    checked, a refused update undone from copies taken before. ``momentum < 0`` stands for None."""
    kernels = _HOST["kernels"] if "kernels" in _HOST else _HOST.setdefault("kernels", host_kernels())
    stats = running_mean is not None and running_var is not None
    if (
        x.dtype not in (torch.float32, torch.float64)
        or not native.supports(x)
        or (weight is not None and weight.dtype != x.dtype)
        or (bias is not None and bias.dtype != x.dtype)
        or (stats and (running_mean.dtype != x.dtype or running_var.dtype != x.dtype or kernels is None))  # type: ignore[union-attr]
    ):
        return None, None, None, UNSUPPORTED
    if stats:
        saved = (running_mean.clone(), running_var.clone())  # type: ignore[union-attr]
        if update:
            factor = momentum if momentum >= 0 else 1.0 / (float(num_batches_tracked.numpy()) + 1.0)  # type: ignore[union-attr]
            out = torch.native_batch_norm(x, weight, bias, running_mean, running_var, True, factor, eps)
        else:  # scratch buffers: the kernel saves the same tensors as in the first forward
            out = torch.native_batch_norm(x, weight, bias, *saved, True, 0.0, eps)
    else:
        out = torch.native_batch_norm(x, weight, bias, None, None, True, 0.0, eps)
    y, save_mean, save_invstd = out
    if kernels is not None:  # aten's saved statistics carry no gradient: NumPy views directly
        code = kernels.check_statistics(save_mean.numpy(), save_invstd.numpy(), kappa_max)
        code = NOT_FINITE if code == kernels.NOT_FINITE else ILL_CONDITIONED if code == kernels.ILL_CONDITIONED else OK
    elif not bool(torch.isfinite(save_mean).all() and torch.isfinite(save_invstd).all()):
        code = NOT_FINITE
    else:
        code = ILL_CONDITIONED if native.kappa(save_mean, save_invstd) > kappa_max else OK
    if stats and update:
        if code == OK:
            if num_batches_tracked is not None:
                num_batches_tracked.add_(1)
        else:
            # through NumPy: aten's autograd node holds the buffers (unused by its training
            # backward), and a torch in-place write would bump their version and fail that backward
            running_mean.numpy()[...] = saved[0].numpy()  # type: ignore[union-attr]
            running_var.numpy()[...] = saved[1].numpy()  # type: ignore[union-attr]
    return y, save_mean, save_invstd, code


def train_aten(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    num_batches_tracked: Tensor,
    num_batches_skipped: Tensor,
    momentum: float | None,
    eps: float,
    where: str,
) -> Tensor | None:
    """The eager step of `train_step` on aten's kernel with aten's autograd (see
    `batchnorm._kernels.dispatch.aten_direct`), or None, having changed nothing, where it
    does not apply or aten's precision is not enough (``|mean| / std`` above
    ``native.KAPPA_MAX``: our kernels then centre first).

    aten updates the running statistics in the kernel, with torch's own rule (momentum, the
    unbiased variance; ``momentum=None`` as the factor 1 / (num_batches_tracked + 1), read from
    CPU memory); the batch statistics are then checked, and a batch that is not finite or too
    ill-conditioned has its update undone from a copy taken before: the rule of `_update_impl`.
    One C++ call when the compiled step is built (`batchnorm._kernels.step_ext`), else its
    Python form `aten_step_py`. A forward recomputed by activation checkpointing (inside a
    backward) does not update."""
    ext = EXT["module"] if "module" in EXT else EXT.setdefault("module", step_ext.load())
    update = running_mean is not None and _c._current_graph_task_id() == -1
    step = aten_step_py if ext is None else ext.train_step
    y, save_mean, save_invstd, code = step(
        x, weight, bias, running_mean, running_var, num_batches_tracked,
        -1.0 if momentum is None else momentum, eps, native.KAPPA_MAX.get(x.dtype, 0.0), update,
    )  # fmt: skip
    if code == OK:
        return y
    if code != NOT_FINITE:
        return None
    if update:
        num_batches_skipped.add_(1)
        if int(num_batches_skipped.numpy()) == 1:
            _warn_skipped(save_mean, save_invstd, num_batches_skipped, where)
    return y


def eval_aten(
    x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> Tensor | None:
    """The eager eval of `eval_forward` on aten's kernel with aten's autograd, or None where
    it does not apply: other dtypes, statistics that need gradients (aten gives none), statistics
    that are not finite, or ``|mean| / sqrt(var + eps)`` above ``native.KAPPA_MAX`` (aten's CPU
    kernel forms ``x * scale + (bias - mean * scale)``, which cancels there; ours centres first).
    The Python form of the compiled ``eval_step`` (`batchnorm._kernels.step_ext`)."""
    if x.dtype not in (torch.float32, torch.float64) or not native.supports(x):
        return None
    for t in (mean, var, weight, bias):
        if t is not None and t.dtype != x.dtype:
            return None
    if mean.requires_grad or var.requires_grad:
        return None
    kernels = _HOST["kernels"] if "kernels" in _HOST else _HOST.setdefault("kernels", host_kernels())
    if kernels is None:
        return None
    if kernels.check_fixed_statistics(mean.numpy(), var.numpy(), eps, native.KAPPA_MAX[x.dtype]):
        return None
    return torch.batch_norm(x, weight, bias, mean, var, False, 0.0, eps, False)
