"""Pure-torch batch-norm kernels: the fallback for every device and the differentiable path.

Every function works per channel (dim 1) of an input shaped (N, C, *spatial) and reduces over
all other dims, m = N * prod(spatial) values per channel.

Numerical policy (see DESIGN.md):
- statistics are computed in ``acc_dtype(x.dtype)``: float64 for float64 input, float32 for
  float32/float16/bfloat16 input;
- the variance is computed *shifted*: d = x - x[first sample] per channel, then the two-pass
  mean/variance of d. For mean 1e4 and std 1e-2 in float32 the subtraction is exact (Sterbenz)
  and the remaining numbers are small, so nothing cancels; var is clamped at >= 0;
- outputs keep the input's dtype and memory format (channels_last in, channels_last out).

These functions are written with plain differentiable torch operations, so autograd can
differentiate through :func:`backward` itself (gradient penalties, ``gradgradcheck``).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "acc_dtype",
    "reduce_dims",
    "channel_view",
    "batch_stats",
    "normalize",
    "train_forward",
    "eval_forward",
    "backward",
]


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype for statistics of an input of ``dtype`` (never below float32)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def reduce_dims(x: Tensor) -> list[int]:
    """All dims except the channel dim 1: ``[0, 2, 3, ...]``."""
    return [0, *range(2, x.dim())]


def channel_view(v: Tensor, ndim: int) -> Tensor:
    """Reshape a per-channel vector (C,) to (1, C, 1, ..., 1) for broadcasting against ndim dims."""
    return v.reshape(1, -1, *([1] * (ndim - 2)))


def _shifted_stats(x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(x in acc_dtype, shift, mean of x - shift, biased var): shift and mean_d (1, C, 1, ...)."""
    xa = x.to(acc_dtype(x.dtype))
    dims = reduce_dims(xa)
    # shift: the first sample's value of each channel, (1, C, 1, ...)
    shift = xa[:1].flatten(2)[..., :1].detach() if xa.dim() > 2 else xa[:1].detach()
    shift = shift.reshape(1, -1, *([1] * (xa.dim() - 2)))
    d = xa - shift
    mean_d = d.mean(dim=dims, keepdim=True)
    var = (d - mean_d).square().mean(dim=dims)
    return xa, shift, mean_d, var.clamp_min(0.0)


def batch_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and *biased* variance of ``x`` (N, C, *), in ``acc_dtype``.

    mean = (1/m) sum x;  var = (1/m) sum (x - mean)^2, computed on x shifted by its first sample
    (see module docstring). Differentiable with respect to ``x``.
    """
    _, shift, mean_d, var = _shifted_stats(x)
    return (mean_d + shift).reshape(-1), var


def normalize(
    x: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
) -> Tensor:
    """y = (x - mean) * (invstd * weight) + bias, per channel.

    ``mean``/``invstd`` are (C,) in the accumulation dtype; the result has x's dtype and layout.
    The mean is subtracted first: folding it into one shift (x * scale - mean * scale) loses all
    precision when |mean| >> std (mean 1e4, std 1e-2 in float32: x * scale ~ 1e6).
    """
    scale = invstd if weight is None else invstd * weight.to(invstd.dtype)
    nd = x.dim()
    y = (x.to(scale.dtype) - channel_view(mean, nd)) * channel_view(scale, nd)
    if bias is not None:
        y = y + channel_view(bias.to(scale.dtype), nd)
    return y.to(x.dtype)


def train_forward(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Training forward: returns (y, mean, var_biased); statistics in ``acc_dtype``.

    y is normalized from the shifted data ((x - shift) - mean_d), whose mean is exact, rather
    than from the rounded mean (an error of ulp(mean)/2 is 5% of std for mean 1e4, std 1e-2).
    """
    xa, shift, mean_d, var = _shifted_stats(x)
    invstd = torch.rsqrt(var + eps)
    y = normalize(xa - shift, mean_d.reshape(-1), invstd, weight, bias).to(x.dtype)
    return y, (mean_d + shift).reshape(-1), var


def eval_forward(
    x: Tensor,
    mean: Tensor,
    var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
) -> Tensor:
    """Inference forward with fixed statistics: y = weight * (x - mean) / sqrt(var + eps) + bias."""
    acc = acc_dtype(x.dtype)
    invstd = torch.rsqrt(var.to(acc) + eps)
    return normalize(x, mean.to(acc), invstd, weight, bias)


def backward(
    grad_y: Tensor,
    x: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Hand-derived training backward (DESIGN.md), per channel with g = dL/dy:

        dbeta  = sum g
        dgamma = sum g * x_hat
        dx     = gamma * invstd * (g - mean(g) - x_hat * mean(g * x_hat))

    Returns (dx in x's dtype and layout, dgamma, dbeta in the accumulation dtype).
    Differentiable in all its tensor arguments.

    ``mean`` must be the batch mean of ``x``: x - mean is re-centred by its own mean, which
    undoes the rounding of a stored float32 mean (mean 1e4, std 1e-2) and is exactly zero
    (value and derivative) for the exact batch mean.
    """
    acc = mean.dtype
    nd = x.dim()
    dims = reduce_dims(x)
    m = x.numel() // x.shape[1]
    g = grad_y.to(acc)
    d = x.to(acc) - channel_view(mean, nd)
    x_hat = (d - d.mean(dim=dims, keepdim=True)) * channel_view(invstd, nd)
    sum_g = g.sum(dim=dims)
    sum_gx = (g * x_hat).sum(dim=dims)
    scale = invstd if weight is None else invstd * weight.to(acc)
    dx = channel_view(scale, nd) * (
        g - channel_view(sum_g / m, nd) - x_hat * channel_view(sum_gx / m, nd)
    )
    return dx.to(x.dtype), sum_gx, sum_g
