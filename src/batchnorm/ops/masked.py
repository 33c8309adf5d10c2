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
from ._path import apply, eager, needs_grad

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


class _MaskedTrain(torch.autograd.Function):
    """The eager form of `masked_train`: the same forward ops, and the backward in closed
    form (BN's, over the real positions) instead of autograd's chain through every op: about
    half the passes over the tensor. g' = g at real positions, 0 elsewhere; R = count:

        dbias = sum g',   dweight = sum g' * x_hat,
        dx    = weight * invstd * (g' - sum g' / R - x_hat * sum(g' * x_hat) / R)   (0 where padded)

    The backward is itself torch ops; under ``create_graph`` it recomputes the centred input and
    the variance differentiably from x, so double backward works."""

    @staticmethod
    def forward(x, mask, weight, bias, eps):  # type: ignore[override]
        m, count, mean, d = _centered(x, mask)
        dims = reduce_dims(x)
        var = d.square().sum(dim=dims) / count.clamp_min(1.0)
        invstd = torch.rsqrt(var + eps)
        shape = (1, -1, *([1] * (x.dim() - 2)))
        scale = invstd if weight is None else invstd * weight.to(invstd.dtype)
        zero = torch.zeros((), dtype=d.dtype, device=d.device)
        shift = zero if bias is None else bias.to(d.dtype).reshape(shape)
        y = torch.where(m, torch.addcmul(shift, d, scale.reshape(shape)), zero).to(x.dtype)
        return y, d, var, count, mean.reshape(-1)

    @staticmethod
    def setup_context(ctx, inputs, output):  # type: ignore[override]
        x, mask, weight, bias, eps = inputs
        _, d, var, count, mean = output
        ctx.save_for_backward(x, mask, weight, d, var, count)
        ctx.eps = eps
        ctx.x_dtype = x.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.mark_non_differentiable(d, var, count, mean)

    @staticmethod
    def backward(ctx, grad_y, _gd, _gv, _gc, _gm):  # type: ignore[override]
        x, mask, weight, d, var, count = ctx.saved_tensors
        dims = reduce_dims(d)
        if torch.is_grad_enabled():
            # create_graph=True (double backward): d and var again, as differentiable functions of x
            _, count, _, d = _centered(x, mask)
            var = d.square().sum(dim=dims) / count.clamp_min(1.0)
        m = mask.unsqueeze(1)
        shape = (1, -1, *([1] * (d.dim() - 2)))
        zero = torch.zeros((), dtype=d.dtype, device=d.device)
        invstd = torch.rsqrt(var + ctx.eps)
        g = torch.where(m, grad_y.to(d.dtype), zero)
        sum_g = g.sum(dim=dims)  # (C,)
        sum_gd = (g * d).sum(dim=dims)  # (C,) = sum g * x_hat / invstd
        scale = invstd if weight is None else invstd * weight.to(invstd.dtype)
        r = count.clamp_min(1.0)
        need_x, _, need_w, need_b = ctx.needs_input_grad[:4]
        dx = dw = db = None
        if need_x:
            a = scale * sum_g / r  # (C,)
            b = scale * invstd.square() * sum_gd / r  # (C,)
            t = torch.addcmul(-a.reshape(shape), g, scale.reshape(shape))
            dx = torch.where(m, torch.addcmul(t, d, -b.reshape(shape)), zero).to(ctx.x_dtype)
        if need_w and weight is not None:
            dw = (sum_gd * invstd).to(weight.dtype)
        if need_b and ctx.bias_dtype is not None:
            db = sum_g.to(ctx.bias_dtype)
        return dx, None, dw, db, None


def masked_train(
    x: Tensor, mask: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Training forward over the real positions (module docstring): (y, mean (C,) float64, biased
    var (C,), count 0-dim). y has x's shape and dtype, 0 at padded positions; differentiable in
    x, weight and bias (mean, var and count are returned detached). On the eager path
    (`batchnorm.ops._path.eager`) with a gradient to compute, through `_MaskedTrain`
    (closed-form backward); elsewhere (compile, export, vmap) autograd differentiates the ops."""
    if eager(x, mask, weight, bias) and needs_grad(x, weight, bias):
        y, _, var, count, mean = apply(_MaskedTrain, x, mask, weight, bias, eps)
        return y, mean.to(torch.float64), var, count
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
