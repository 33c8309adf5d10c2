"""The BatchNorm*d training forward as torch.compile traces it (private): our math in torch ops
that Inductor fuses with the neighbours, with a hand-written backward.

Per channel c over its m values, with ``shift`` the channel's first value:

    d = x - shift                       (exact for x within a factor 2 of the shift: Sterbenz)
    mean_d = (1/m) sum d,  var = (1/m) sum (d - mean_d)^2       (acc_dtype; var clamped >= 0)
    scale = weight * rsqrt(var + eps)
    y = d * scale - (mean_d * scale - bias)
    mean = shift + mean_d                                        (float64, for the running mean)

x - mean is never formed in the element loop: d is exact and ``mean_d`` is small, so
``d - mean_d`` keeps the precision of the spread (mean 1e4, std 1e-2 in float32 does not
cancel) without the float64 arithmetic per element that centering on a float64 mean costs
(`batchnorm._kernels.torch_ops.center`). The element loops match torch's own decomposition: a
sum pass and a squared-deviation pass for the statistics, one multiply-add per element for y;
the backward is one pass for both sums and one for dx,

    x_hat = (d - mean_d) * rsqrt(var + eps)
    dx = scale * (g - mean(g) - x_hat * mean(g * x_hat)),  dweight = sum g * x_hat,  dbias = sum g

rather than autograd's derivative of the forward's operations. The backward is written in
differentiable torch ops; under a double backward (grad mode on inside it) it recomputes the
statistics from x, so second derivatives are exact, as on the eager path.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .._kernels.torch_ops import acc_dtype, channel_view, reduce_dims
from .._kernels.torch_ops import train_forward as _train_forward_generic

__all__ = ["train_forward"]


class _Train(torch.autograd.Function):
    """(y, mean float64 (C,), biased var (C,)) of a non-empty x (N, C, *); see the module docstring."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float):  # type: ignore[override]
        acc, nd = acc_dtype(x.dtype), x.dim()
        xa = x.to(acc)
        # as torch_ops.batch_stats (inlined there: the eager hot path), keeping shift and mean_d
        first = xa[:1].flatten(2)[..., :1] if nd > 2 else xa[:1]
        shift = channel_view(first.reshape(-1), nd)
        d = xa - shift
        var, mean_d = torch.var_mean(d, dim=reduce_dims(x), correction=0, keepdim=True)
        var = var.clamp_min(0.0)
        invstd = torch.rsqrt(var + eps)
        scale = invstd if weight is None else invstd * channel_view(weight.to(acc), nd)
        offset = mean_d * scale if bias is None else mean_d * scale - channel_view(bias.to(acc), nd)
        y = (d * scale - offset).to(x.dtype)
        mean = (shift.double() + mean_d.double()).reshape(-1)
        var_c = var.reshape(-1)
        ctx.save_for_backward(x, weight, shift, mean_d, invstd)
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.eps = eps
        ctx.mark_non_differentiable(mean, var_c)
        return y, mean, var_c

    @staticmethod
    def backward(ctx: Any, grad_y: Tensor, _gm: Any, _gv: Any):  # type: ignore[override]
        x, weight, shift, mean_d, invstd = ctx.saved_tensors
        acc = acc_dtype(x.dtype)
        dims = reduce_dims(x)
        m = x.numel() // x.shape[1]
        g = grad_y.to(acc)
        d = x.to(acc) - shift
        if torch.is_grad_enabled():  # a double backward: the statistics as functions of x
            var, mean_d = torch.var_mean(d, dim=dims, correction=0, keepdim=True)
            invstd = torch.rsqrt(var + ctx.eps)
        x_hat = (d - mean_d) * invstd
        sum_g = g.sum(dim=dims, keepdim=True)
        sum_gx = (g * x_hat).sum(dim=dims, keepdim=True)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dx = dw = db = None
        if need_x:
            scale = invstd if weight is None else invstd * channel_view(weight.to(acc), x.dim())
            dx = (scale * (g - sum_g / m - x_hat * (sum_gx / m))).to(x.dtype)
        if need_w and weight is not None:
            dw = sum_gx.reshape(-1).to(weight.dtype)
        if need_b and ctx.bias_dtype is not None:
            db = sum_g.reshape(-1).to(ctx.bias_dtype)
        return dx, dw, db, None


def train_forward(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """(y, mean float64 (C,), biased var (C,)) for torch.compile to trace; mean and var carry no
    gradient (the layer step only updates running statistics with them). An empty x takes the
    generic torch-ops forward (NaN statistics)."""
    if x.numel() == 0:
        return _train_forward_generic(x, weight, bias, eps)
    return _Train.apply(x, weight, bias, eps)  # type: ignore[no-any-return]
