"""The running-statistics rule, and every implementation of it (one rule, tested on every path
by tests/test_update_paths.py):

    running = (1 - f) * running + f * batch,   f = momentum, or 1 / (num_batches_tracked + 1)
                                               when momentum is None (the cumulative average)

with the batch variance unbiased (``var * m / (m - 1)``) for BN's ``running_var``. A batch whose
statistics are not all finite writes nothing and counts in ``num_batches_skipped`` instead of
``num_batches_tracked``; an empty batch changes nothing; a forward recomputed by activation
checkpointing (inside a backward) changes nothing.

- `_update_host`: one compiled call on CPU memory (`cpu_small.update_running`; NumPy
  without numba), for one layer's float32/float64 statistics on the eager path;
- `_update`: torch ops on the device, no host read (16-bit buffers, vmap, CUDA);
- ``batchnorm::update_running_stats``: the operator (fake and vmap rules) for the dispatcher;
- `update_eager` / `update_running_stats_`: the entries the steps call.

aten's in-kernel update (``batchnorm.ops.aten_step.train_aten``) applies torch's form of the same
rule and is undone for the batches the rule leaves out.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .._kernels import native
from .._kernels.dispatch import host_kernels
from ._common import to_front
from ._path import eager, recomputing

__all__ = ["update_eager", "update_running_stats", "update_running_stats_"]

_c = torch._C


def _update_impl(
    running_mean: Tensor,
    running_var: Tensor,
    num_batches_tracked: Tensor,
    num_batches_skipped: Tensor,
    mean: Tensor,
    var: Tensor,
    count: int,
    momentum: float | None,
    unbiased: bool,
    where: str,
) -> None:
    """running = (1 - f) * running + f * batch, with the batch variance unbiased (var * m/(m-1))
    when ``unbiased`` (BN's running_var; batch renorm passes its std with ``unbiased=False``).

    f = ``momentum``, or 1 / (num_batches_tracked + 1) when ``momentum`` is None (cumulative
    average). A batch whose statistics are not all finite writes nothing and increments
    ``num_batches_skipped`` instead of ``num_batches_tracked``; an empty batch (count 0)
    changes nothing. Everything happens on the device: no value is read back to the host
    (on CPU the first skipped batch of a counter warns). Leading batch dims (vmap) allowed:
    running (..., C), counters (...).
    """
    if _update_host(
        running_mean, running_var, num_batches_tracked, num_batches_skipped, mean, var, count, momentum, unbiased, where
    ):  # HOST_DONE (nothing here is checked, so never HOST_IMPRECISE)
        return
    _update(running_mean, running_var, num_batches_tracked, num_batches_skipped, mean, var, count, momentum, unbiased)
    # CPU only: the counter is already in host memory (reading it is no device sync); other
    # devices never read it back and do not warn (the counter is there to be read when wanted)
    if count > 0 and num_batches_skipped.device.type == "cpu" and (num_batches_skipped == 1).any().numpy():
        _warn_skipped(mean, var, num_batches_skipped, where)


_HOST_DTYPES = (torch.float32, torch.float64)
_all = np.logical_and.reduce  # ndarray.all() goes through a Python wrapper; the ufunc reduction does not


_HOST: dict[str, Any] = {}
"""The host kernels module (or None without numba), looked up on the first update."""
HOST_SKIPPED, HOST_DONE, HOST_IMPRECISE = 0, 1, 2
"""The results of `_update_host`: not applicable (nothing done), done, or the producing
kernel's precision check failed (nothing done)."""


def _update_host(
    running_mean: Tensor,
    running_var: Tensor,
    num_batches_tracked: Tensor,
    num_batches_skipped: Tensor,
    mean: Tensor,
    var: Tensor,
    count: int,
    momentum: float | None,
    unbiased: bool,
    where: str,
    check: tuple[float, Tensor, Tensor] | None = None,
) -> int:
    """The same update on the tensors' CPU memory, for one layer's float32/float64 statistics: one
    compiled call (`batchnorm._kernels.cpu_small.update_running`; NumPy without numba)
    instead of a dozen torch ops, which are most of a small layer's step.

    ``check`` = (kappa_max, save_mean, save_invstd): first verify the producing kernel's
    precision, ``|save_mean| * save_invstd <= kappa_max`` per channel. Returns ``HOST_SKIPPED``
    (does not apply here), ``HOST_IMPRECISE`` (the check failed) or ``HOST_DONE``."""
    if count == 0:
        return HOST_DONE
    for t in (running_mean, running_var, num_batches_tracked, num_batches_skipped, mean, var):
        if t.device.type != "cpu" or t.requires_grad:
            return HOST_SKIPPED
    if running_mean.dim() != 1 or num_batches_tracked.dim() != 0 or num_batches_skipped.dim() != 0:
        return HOST_SKIPPED
    if running_mean.dtype not in _HOST_DTYPES or running_var.dtype not in _HOST_DTYPES or var.dtype not in _HOST_DTYPES:
        return HOST_SKIPPED
    if mean.dtype not in _HOST_DTYPES:
        return HOST_SKIPPED
    f = momentum if momentum is not None else 1.0 / (float(num_batches_tracked.numpy()) + 1.0)
    unbias = count / (count - 1) if unbiased and count > 1 else 1.0
    m, v, rm, rv = mean.numpy(), var.numpy(), running_mean.numpy(), running_var.numpy()
    kernels = _HOST["kernels"] if "kernels" in _HOST else _HOST.setdefault("kernels", host_kernels())
    if kernels is not None:
        code = kernels.update_running(rm, rv, m, v, f, unbias, *(() if check is None else _check_arrays(check)))
        if code == kernels.ILL_CONDITIONED:
            return HOST_IMPRECISE
        finite = code == kernels.UPDATED
    else:
        if check is not None and native.kappa(check[1], check[2]) > check[0]:
            return HOST_IMPRECISE
        finite = bool(_all(np.isfinite(m)) and _all(np.isfinite(v)))
        if finite:
            rm[...] = rm.astype(np.float64) * (1.0 - f) + f * m  # in float64, rounded once, as the torch form
            rv[...] = rv.astype(np.float64) * (1.0 - f) + f * (v.astype(np.float64) * unbias)
    if not finite:
        num_batches_skipped.add_(1)
        if int(num_batches_skipped.numpy()) == 1:
            _warn_skipped(mean, var, num_batches_skipped, where)
        return HOST_DONE
    num_batches_tracked.add_(1)
    return HOST_DONE


def _check_arrays(check: tuple[float, Tensor, Tensor]) -> tuple[float, np.ndarray, np.ndarray]:
    return check[0], check[1].detach().numpy(), check[2].detach().numpy()


def _all_finite(mean: Tensor, var: Tensor) -> Tensor:
    """Per leading index (...): every statistic over the last dim (C) finite. Written with
    ``isfinite``, never as ``x * 0``: Inductor folds ``x * 0`` to 0, NaN or not."""
    return torch.isfinite(mean).all(-1) & torch.isfinite(var).all(-1)


def _warn_skipped(mean: Tensor, var: Tensor, skipped: Tensor, where: str) -> None:
    bad = ~_all_finite(mean, var)
    if (bad & (skipped == 1)).any().numpy():
        warnings.warn(
            f"{where}: batch statistics are not finite (NaN/inf in the input) or undefined (a synchronized "
            "batch of at most one value per channel); running statistics and "
            "num_batches_tracked were left unchanged (warned once per layer; num_batches_skipped counts)",
            RuntimeWarning,
            stacklevel=2,
        )


def _update(
    running_mean: Tensor,
    running_var: Tensor,
    num_batches_tracked: Tensor,
    num_batches_skipped: Tensor,
    mean: Tensor,
    var: Tensor,
    count: int,
    momentum: float | None,
    unbiased: bool,
) -> None:
    if count == 0:
        return
    ok = _all_finite(mean, var)  # (...)
    if momentum is None:
        factor = 1.0 / (num_batches_tracked.to(torch.float64) + 1.0)  # (...)
        factor = factor.unsqueeze(-1)
    else:
        factor = torch.tensor(momentum, dtype=torch.float64, device=mean.device)
    unbias = count / (count - 1) if unbiased and count > 1 else 1.0
    keep = ok.unsqueeze(-1)
    rm = running_mean.to(torch.float64)
    rv = running_var.to(torch.float64)
    new_mean = rm * (1.0 - factor) + factor * mean.to(torch.float64)
    new_var = rv * (1.0 - factor) + factor * (var.to(torch.float64) * unbias)
    running_mean.copy_(torch.where(keep, new_mean, rm))
    running_var.copy_(torch.where(keep, new_var, rv))
    num_batches_tracked.add_(ok.to(num_batches_tracked.dtype))
    num_batches_skipped.add_((~ok).to(num_batches_skipped.dtype))


update_running_stats = torch.library.custom_op(
    "batchnorm::update_running_stats",
    _update_impl,
    mutates_args=("running_mean", "running_var", "num_batches_tracked", "num_batches_skipped"),
)


@update_running_stats.register_fake
def _update_fake(
    running_mean, running_var, num_batches_tracked, num_batches_skipped, mean, var, count, momentum, unbiased, where
):
    return None


def _update_vmap(
    info: Any, in_dims: tuple[Any, ...], rm, rv, nbt, skipped, mean, var, count, momentum, unbiased, where
):
    b = info.batch_size
    rmd, rvd, nd, sd, md, vd = in_dims[:6]
    if any(d is None for d in (rmd, rvd, nd, sd)) and any(d is not None for d in (md, vd)):
        raise ValueError(
            f"{where}: under vmap, per-sample batch statistics cannot update shared running statistics in place; "
            "stack the buffers too (torch.func.stack_module_state) or use "
            "torch.func.replace_all_batch_norm_modules_"
        )
    update_running_stats(
        to_front(rm, rmd, b),
        to_front(rv, rvd, b),
        to_front(nbt, nd, b),
        to_front(skipped, sd, b),
        to_front(mean, md, b),
        to_front(var, vd, b),
        count,
        momentum,
        unbiased,
        where,
    )
    return None, None


update_running_stats.register_vmap(_update_vmap)


def update_eager(
    running_mean: Tensor,
    running_var: Tensor,
    num_batches_tracked: Tensor,
    num_batches_skipped: Tensor,
    mean: Tensor,
    var: Tensor,
    count: int,
    momentum: float | None,
    where: str,
    unbiased: bool = True,
) -> None:
    """The running-statistics update of a step already on the eager path: one compiled call on
    CPU memory (`_update_host`) where it applies, else torch ops (`_update_impl`)."""
    if _c._current_graph_task_id() != -1:  # recomputed by activation checkpointing: no update
        return
    state = (running_mean, running_var, num_batches_tracked, num_batches_skipped)
    if _update_host(*state, mean, var, count, momentum, unbiased, where) == HOST_SKIPPED:
        with torch.no_grad():
            _update_impl(*state, mean.detach(), var.detach(), count, momentum, unbiased, where)


def update_running_stats_(
    running_mean: Tensor,
    running_var: Tensor,
    num_batches_tracked: Tensor,
    num_batches_skipped: Tensor,
    mean: Tensor,
    var: Tensor,
    count: int,
    momentum: float | None,
    where: str,
    unbiased: bool = True,
) -> None:
    """Apply `update_running_stats` (in place, no autograd). On the eager path one layer's
    float32/float64 CPU statistics are updated on CPU memory (`_update_host`), everything
    else with torch ops on the device (`_update`); both apply the same rule. Nothing happens in
    a forward recomputed by activation checkpointing (`batchnorm.ops._path.recomputing`)."""
    args = (running_mean, running_var, num_batches_tracked, num_batches_skipped)
    if eager(*args, mean, var):
        update_eager(*args, mean, var, count, momentum, where, unbiased)
        return
    if recomputing():
        return
    with torch.no_grad():
        update_running_stats(*args, mean.detach(), var.detach(), count, momentum, unbiased, where)
