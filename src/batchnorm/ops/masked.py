"""Masked batch statistics: batch norm over the real positions of a padded batch.

``mask`` (N, *spatial) bool, True where a value is real; x (N, C, *spatial). Per channel c, over
the R = sum(mask) real positions p:

    mean = (1/R) sum_p x[p, c],   var = (1/R) sum_p (x[p, c] - mean)^2            (biased)
    y[p, c] = weight * (x[p, c] - mean) / sqrt(var + eps) + bias    at real positions, 0 at padded

Padded positions are replaced by 0 with ``torch.where`` before any arithmetic, so whatever they
hold (NaN, inf) reaches neither the statistics nor the output, and their gradient is exactly 0.
The functions are differentiable torch ops of fixed shapes (masked sums: no data-dependent
shape, no host read), so torch.compile (fullgraph), torch.export and vmap take them as they are;
the gradients are autograd's through those ops (the same as batch norm on the packed real
values). Statistics in ``acc_dtype`` (float32, float64 for float64 input), two passes (the mean,
then the centred squares): nothing large is squared.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._kernels.torch_ops import reduce_dims
from ._common import acc_dtype

__all__ = ["masked_moments", "masked_train"]


def _centered(x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(m (N, 1, *) bool, count (0-dim), mean (1, C, 1...), d = x - mean at real positions, 0 elsewhere)."""
    acc = acc_dtype(x.dtype)
    m = mask.unsqueeze(1)  # (N, 1, *spatial): broadcasts over C
    dims = reduce_dims(x)
    zero = torch.zeros((), dtype=acc, device=x.device)
    xr = torch.where(m, x.to(acc), zero)  # (N, C, *), padded -> 0
    count = mask.sum().to(acc)  # real values per channel
    mean = xr.sum(dim=dims, keepdim=True) / count.clamp_min(1.0)  # (1, C, 1, ...)
    d = torch.where(m, xr - mean, zero)
    return m, count, mean, d


def masked_moments(x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(count 0-dim, mean (C,), biased var (C,)) over the real positions, in ``acc_dtype``;
    count 0 gives mean 0 and var 0. Differentiable."""
    _, count, mean, d = _centered(x, mask)
    var = d.square().sum(dim=reduce_dims(x)) / count.clamp_min(1.0)
    return count, mean.reshape(-1), var


def masked_train(
    x: Tensor, mask: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Training forward over the real positions (module docstring): (y, mean (C,) float64, biased
    var (C,), count 0-dim). y has x's shape and dtype, 0 at padded positions; differentiable in
    x, weight and bias (mean, var and count are returned detached)."""
    m, count, mean, d = _centered(x, mask)
    dims = reduce_dims(x)
    var = d.square().sum(dim=dims) / count.clamp_min(1.0)  # (C,)
    shape = (1, -1, *([1] * (x.dim() - 2)))
    y = d * torch.rsqrt(var + eps).reshape(shape)
    if weight is not None:
        y = y * weight.to(y.dtype).reshape(shape)
    if bias is not None:
        y = y + bias.to(y.dtype).reshape(shape)
    y = torch.where(m, y, torch.zeros((), dtype=y.dtype, device=y.device)).to(x.dtype)
    return y, mean.detach().reshape(-1).to(torch.float64), var.detach(), count.detach()
