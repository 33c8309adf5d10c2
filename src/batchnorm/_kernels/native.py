"""The kernel back-end on torch's own batch-norm kernels (``aten::native_batch_norm`` and its backward).

These aten operators exist on every device: on CUDA they are torch's fast batch-norm kernels,
on CPU its vectorized ones, so the same code runs in the CPU test suite. The contract is
`batchnorm._kernels.torch_ops`' (mean in float64, biased var and parameter gradients in
``acc_dtype``; outputs in x's dtype and memory format); 16-bit inputs run with float32
weight, bias and statistics (aten's mixed-type path), so nothing is copied to float32.

Statistics without recovering them from ``invstd``: the kernel also updates running
statistics, so `train_forward` hands it fresh zero buffers with momentum 1, and gets back
``running_mean = mean`` and ``running_var = m / (m - 1) * var`` (aten's unbiased update); the
biased variance is that times ``(m - 1) / m``. Its relative error is a few units of float32
rounding at every size of var, while ``1 / invstd^2 - eps`` loses ``eps / var`` times that:
for var ~ eps half the float32 digits would survive only with ``var >> eps``, and for
var << eps none (var = 1e-9 with eps = 1e-5 would come back with a relative error near 1e-3).
m = 1 (one value per channel) gives var = 0 directly (aten's unbiased variance is 0/0 there).

Precision limit of the aten kernels, and what is done about it. Let ``kappa = |mean| / std``
per channel and u the unit roundoff of the accumulation dtype (2^-24 for float32). aten keeps
the batch mean in float32 and, on CPU, normalizes as ``x * alpha + beta`` with
``beta = bias - mean * alpha``; on CUDA as ``(x - mean) * alpha + bias``. Either way the
output, the gradients and the mean carry an error of about ``kappa * u`` relative to their
scale (``|weight|`` for y): 1e-7 at kappa = 1, but 6% at mean 1e4 / std 1e-2 (kappa = 1e6),
where the float32 input itself is quantized to about a tenth of its spread. Therefore:

- on CPU, where reading a per-channel vector is no device synchronization, every function
  checks ``max kappa`` (from the kernel's own mean and invstd; eval: from the given
  statistics) and hands inputs with ``kappa > KAPPA_MAX[dtype]`` (``2^7`` for float32 and
  16-bit inputs: an error bound of ``2^-17``, about 7.6e-6; ``2^35`` for float64) to
  `torch_ops`, which centers before it reduces;
- on other devices no value is read back (no host sync, CUDA graphs keep working), so the
  training forward and the backward have the kernels' precision, the same as
  ``torch.nn.BatchNorm*d`` there. For ill-conditioned data (``kappa`` above ~1e3) use
  ``batchnorm.use_backend("torch")``, which centers first. The eval forward is exact there:
  the float64 mean's float32 rounding residual r is folded into the bias,
  ``bias' = bias - r * weight * invstd``, and CUDA's kernel subtracts the (float32) mean
  before it scales.

`backward_sums` and `backward_apply` (SyncBatchNorm's pieces) are torch_ops' own.
Not differentiable twice (the operators differentiate torch_ops for create_graph).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from . import torch_ops
from .torch_ops import acc_dtype, backward_apply, backward_sums  # noqa: F401 - re-exported: same contracts

__all__ = [
    "KAPPA_MAX",
    "supports",
    "train_forward",
    "eval_forward",
    "fold_mean_residual",
    "backward",
    "batch_stats",
    "backward_sums",
    "backward_apply",
]

_aten = torch.ops.aten
_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

KAPPA_MAX = {torch.float64: 2.0**35, torch.float32: 2.0**7, torch.float16: 2.0**7, torch.bfloat16: 2.0**7}
"""Largest ``|mean| / std`` per input dtype that CPU inputs run on the aten kernels with
(error bound ``KAPPA_MAX * u = 2^-17`` relative); larger goes to torch_ops (see module docstring)."""


def supports(x: Tensor) -> bool:
    """True for non-empty strided floating tensors of 2+ dims (float32/float64/float16/bfloat16),
    contiguous or channels-last, on any device; False sends dispatch to torch ops."""
    if not isinstance(x, Tensor) or x.layout != torch.strided or x.dtype not in _DTYPES:
        return False
    if x.dim() < 2 or x.numel() == 0 or x.is_neg() or x.is_conj():
        return False
    if x.is_contiguous():
        return True
    if x.dim() == 4:
        return x.is_contiguous(memory_format=torch.channels_last)
    return x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d)


def _param(v: Tensor | None, acc: torch.dtype) -> Tensor | None:
    """A weight or bias in the kernels' parameter dtype (``acc``), or None."""
    return None if v is None else v.detach().to(acc)


def kappa(mean: Tensor, invstd: Tensor) -> float:
    """``max |mean| * invstd`` over the channels of CPU tensors (NaN compares as 0; 0 for none)."""
    k = np.abs(mean.detach().numpy()) * np.abs(invstd.detach().numpy())
    return float(np.nanmax(k, initial=0.0)) if k.size else 0.0


def _ill_conditioned(x: Tensor, mean: Tensor, invstd: Tensor) -> bool:
    """True when x is a CPU tensor and some channel has ``|mean| * invstd > KAPPA_MAX``.

    Read on the host only for CPU tensors (no device synchronization); NaN compares False,
    so non-finite batches keep the kernels' NaN propagation.
    """
    if x.device.type != "cpu":
        return False
    kappa = np.abs(mean.detach().numpy()) * np.abs(invstd.detach().numpy())
    return bool(np.max(kappa) > KAPPA_MAX[x.dtype]) if kappa.size else False


def train_forward(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """Training forward: ``(y, mean float64, biased var in acc_dtype)``.

    ``y = weight * (x - mean) / sqrt(var + eps) + bias`` with the batch's statistics, by one
    ``aten::native_batch_norm`` call (var from its running-variance update, see the module
    docstring). Shape: x (N, C, *) -> y (N, C, *) in x's dtype and memory format, mean, var (C,).
    """
    acc = acc_dtype(x.dtype)
    c = x.shape[1]
    m = x.numel() // c
    run_mean = torch.zeros(c, dtype=acc, device=x.device)
    run_var = torch.zeros(c, dtype=acc, device=x.device)
    y, mean, invstd = _aten.native_batch_norm(
        x, _param(weight, acc), _param(bias, acc), run_mean, run_var, True, 1.0, eps
    )
    if _ill_conditioned(x, mean, invstd):
        return torch_ops.train_forward(x.detach(), weight, bias, eps)
    if m > 1:
        var = run_var.mul_((m - 1) / m)  # unbiased -> biased
    else:
        var = run_var.zero_()  # one value per channel: aten's unbiased var is 0/0
    return y, mean.to(torch.float64), var


def eval_forward(
    x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> Tensor:
    """Inference forward ``y = weight * (x - mean) / sqrt(var + eps) + bias`` by aten's eval kernel.

    A float64 ``mean`` with a float32 (or 16-bit) input is rounded to float32 and its residual
    folded into the bias (see the module docstring). Shape: x (N, C, *), mean, var, weight,
    bias (C,) -> y of x's shape, dtype and memory format.
    """
    acc = acc_dtype(x.dtype)
    mean_a = mean.detach().to(acc)
    var_a = var.detach().to(acc)
    if x.device.type == "cpu":
        with np.errstate(divide="ignore", invalid="ignore"):
            invstd = 1.0 / np.sqrt(var_a.numpy().astype(np.float64) + eps)
        if _ill_conditioned(x, mean_a, torch.from_numpy(invstd)):
            return torch_ops.eval_forward(x.detach(), mean, var, weight, bias, eps)
    b: Tensor | None = _param(bias, acc)
    if mean.dtype == torch.float64 and acc != torch.float64:
        b = fold_mean_residual(mean, var_a, weight, bias, eps, acc)
    y, _, _ = _aten._native_batch_norm_legit_no_training(x, _param(weight, acc), b, mean_a, var_a, 0.0, eps)
    return y


def fold_mean_residual(
    mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, acc: torch.dtype
) -> Tensor:
    """The bias that makes the eval kernel exact with the mean rounded to ``acc``.

    With ``mean_a = mean.to(acc)`` and ``r = mean - mean_a`` (in float64), ``s = weight / sqrt(var + eps)``:
    ``(x - mean) * s + bias = (x - mean_a) * s + (bias - r * s)``; returns ``bias - r * s``
    in ``acc`` (C,), computed in float64. ``bias`` None counts as zeros, ``weight`` None as ones.
    """
    mean64 = mean.detach().to(torch.float64)
    resid = mean64 - mean64.to(acc).to(torch.float64)
    scale = torch.rsqrt(var.detach().to(torch.float64) + eps)
    if weight is not None:
        scale = scale * weight.detach().to(torch.float64)
    shift = resid * scale
    return (-shift if bias is None else bias.detach().to(torch.float64) - shift).to(acc)


def backward(
    grad_y: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """Training backward by ``aten::native_batch_norm_backward`` around the given mean and invstd:

        dbeta = sum g,  dgamma = sum g x_hat,  dx = weight invstd (g - dbeta/m - x_hat dgamma/m),
        x_hat = (x - mean) * invstd.

    ``mean`` and ``invstd`` need not be x's own statistics (BN+activation passes others).
    Returns (dx in x's dtype and memory format, dgamma, dbeta in ``acc_dtype``).

    Shape: grad_y, x (N, C, *) -> dx (N, C, *), dgamma (C,), dbeta (C,).
    """
    acc = acc_dtype(x.dtype)
    mean_a = mean.detach().to(acc)
    invstd_a = invstd.detach().to(acc)
    if grad_y.dtype != x.dtype or grad_y.shape != x.shape or _ill_conditioned(x, mean_a, invstd_a):
        return torch_ops.backward(grad_y, x, mean, invstd, weight)
    dx, dw, db = _aten.native_batch_norm_backward(
        grad_y, x, _param(weight, acc), None, None, mean_a, invstd_a, True, 0.0, [True, True, True]
    )
    return dx, dw.to(acc), db.to(acc)


def batch_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """The statistics pass alone: ``(mean float64, biased var in acc_dtype)``, each (C,), by one
    ``torch.var_mean`` reduction in ``acc_dtype`` (CPU inputs with ``kappa > KAPPA_MAX``: torch_ops)."""
    acc = acc_dtype(x.dtype)
    xa = x.detach().to(acc)
    var, mean = torch.var_mean(xa, dim=torch_ops.reduce_dims(xa), correction=0)
    if x.device.type == "cpu":
        with np.errstate(divide="ignore", invalid="ignore"):
            invstd = torch.from_numpy(1.0 / np.sqrt(var.numpy().astype(np.float64)))
        if _ill_conditioned(x, mean, invstd):
            return torch_ops.batch_stats(x.detach())
    return mean.to(torch.float64), var
