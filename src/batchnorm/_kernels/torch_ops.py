"""Pure-torch batch-norm kernels: the fallback for every device and the differentiable path.

Every function works per channel (dim 1) of an input shaped (N, C, *spatial) and reduces over
all other dims, m = N * prod(spatial) values per channel.

Numerical policy:
- statistics are computed in ``acc_dtype(x.dtype)``: float64 for float64 input, float32 for
  float32/float16/bfloat16 input;
- the variance is computed *shifted*: d = x - x[first sample] per channel, then the two-pass
  mean/variance of d. For mean 1e4 and std 1e-2 in float32 the subtraction is exact (Sterbenz)
  and the remaining numbers are small, so nothing cancels; var is clamped at >= 0;
- the batch mean is returned in float64 (a (C,) vector: cheap), because a float32 mean of 1e4
  is off by up to 5e-4, which is 5% of a 1e-2 spread. Centering (`center`) subtracts the
  float32-rounded mean (exact by Sterbenz) and then the small float64 residual, so x - mean
  keeps the precision of the spread, not of the magnitude;
- outputs keep the input's dtype and memory format (channels_last in, channels_last out).

These functions are written with plain differentiable torch operations, so autograd can
differentiate through `backward` itself (gradient penalties, ``gradgradcheck``).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "merge_moments",
    "acc_dtype",
    "reduce_dims",
    "channel_view",
    "batch_stats",
    "center",
    "normalize",
    "train_forward",
    "eval_forward",
    "backward",
    "backward_sums",
    "backward_apply",
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


def batch_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean (float64) and *biased* variance (``acc_dtype``) of ``x`` (N, C, *).

    mean = (1/m) sum x;  var = (1/m) sum (x - mean)^2, computed on x shifted by its first sample
    (see module docstring). Differentiable with respect to ``x``.
    """
    acc = acc_dtype(x.dtype)
    xa = x.to(acc)
    dims = reduce_dims(xa)
    view = (1, xa.shape[1], *([1] * (xa.dim() - 2)))
    if xa.numel() == 0:  # no first value, no degrees of freedom: NaN statistics, no warning
        shift = xa.new_zeros(view)
        mean_d = xa.mean(dim=dims, keepdim=True)
        var = (xa - mean_d).square().mean(dim=dims, keepdim=True)
    else:
        # shift: the first value of each channel, (1, C, 1, ..., 1)
        first = xa.detach()[:1].flatten(2)[..., :1] if xa.dim() > 2 else xa.detach()[:1]
        shift = first.reshape(view)
        d = xa - shift  # (N, C, *), exact for values within a factor 2 of the shift
        # one pass (torch's Welford reduction; Inductor fuses it with the subtraction above)
        var, mean_d = torch.var_mean(d, dim=dims, correction=0, keepdim=True)
    mean = (mean_d.double() + shift.double()).reshape(-1)  # (C,) float64
    return mean, var.reshape(-1).clamp_min(0.0)


def merge_moments(counts: Tensor, means: Tensor, m2s: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Chan et al.'s parallel merge of K parts' (count, mean, M2) into the whole's: the one merge
    of the library (ghost batches, processes, streamed batches all use it).

        n    = sum_k n_k
        mean = sum_k n_k mean_k / n
        M2   = sum_k M2_k + sum_k n_k (mean_k - mean)^2

    Shapes: counts (K,), means and m2s (K, C) -> (n 0-dim, mean (C,), M2 (C,)) (C may be any
    shape), in their dtype
    (float64 in every caller). A weighted average of the means and a sum of non-negative terms:
    nothing cancels. Parts with n_k = 0 contribute nothing; for n = 0 the mean and M2 are 0;
    non-finite parts give non-finite results. Differentiable, no host read.
    """
    n = counts.sum()
    per_part = counts.reshape(counts.shape[0], *([1] * (means.dim() - 1)))  # (K, 1, ...)
    mean = (per_part / n.clamp_min(1.0) * means).sum(0)  # (C,)
    m2 = m2s.sum(0) + (per_part * (means - mean).square()).sum(0)  # (C,)
    return n, mean, m2


def center(x: Tensor, mean: Tensor) -> Tensor:
    """x - mean per channel, in ``acc_dtype(x.dtype)``, without losing a float64 mean's digits.

    Subtracts the mean rounded to the accumulation dtype first (exact when x is near it), then
    the rounding residual. Differentiable in both arguments.
    """
    acc = acc_dtype(x.dtype)
    nd = x.dim()
    rounded = mean.to(acc)
    d = x.to(acc) - channel_view(rounded, nd)
    if mean.dtype != acc:
        d = d - channel_view((mean - rounded.to(mean.dtype)).to(acc), nd)
    return d


def normalize(
    x: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
) -> Tensor:
    """y = (x - mean) * invstd * weight + bias, per channel.

    ``mean``/``invstd`` are (C,); the result has x's dtype and memory format.
    """
    nd = x.dim()
    scale = invstd if weight is None else invstd * weight.to(invstd.dtype)
    y = center(x, mean) * channel_view(scale.to(acc_dtype(x.dtype)), nd)
    if bias is not None:
        y = y + channel_view(bias.to(y.dtype), nd)
    return y.to(x.dtype)


def train_forward(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """Training forward: returns (y, mean, var_biased); statistics in ``acc_dtype``."""
    mean, var = batch_stats(x)
    invstd = torch.rsqrt(var + eps)
    return normalize(x, mean, invstd, weight, bias), mean, var


def eval_forward(
    x: Tensor,
    mean: Tensor,
    var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
) -> Tensor:
    """Inference forward with fixed statistics: y = weight * (x - mean) / sqrt(var + eps) + bias."""
    invstd = torch.rsqrt(var.to(acc_dtype(x.dtype)) + eps)
    return normalize(x, mean, invstd, weight, bias)


def backward(
    grad_y: Tensor,
    x: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Hand-derived training backward, per channel with g = dL/dy:

        dbeta  = sum g
        dgamma = sum g * x_hat
        dx     = gamma * invstd * (g - mean(g) - x_hat * mean(g * x_hat))

    Returns (dx in x's dtype and layout, dgamma, dbeta in the accumulation dtype).
    Differentiable in all its tensor arguments.
    """
    acc = acc_dtype(x.dtype)
    nd = x.dim()
    dims = reduce_dims(x)
    m = x.numel() // x.shape[1]
    g = grad_y.to(acc)
    invstd = invstd.to(acc)
    x_hat = center(x, mean) * channel_view(invstd, nd)
    sum_g = g.sum(dim=dims)
    sum_gx = (g * x_hat).sum(dim=dims)
    scale = invstd if weight is None else invstd * weight.to(acc)
    dx = channel_view(scale, nd) * (g - channel_view(sum_g / m, nd) - x_hat * channel_view(sum_gx / m, nd))
    return dx.to(x.dtype), sum_gx, sum_g


def _centered(x: Tensor, mean: Tensor) -> tuple[Tensor, Tensor]:
    """(d, resid): d = x - mean rounded to ``acc_dtype`` (N, C, *), exact for x near the mean
    (Sterbenz), and the float64 residual resid = mean - rounded (C,), so x - mean = d - resid."""
    acc = acc_dtype(x.dtype)
    mean64 = mean.to(torch.float64)
    rounded = mean64.to(acc)  # (C,)
    d = x.to(acc) - channel_view(rounded, x.dim())  # (N, C, *)
    return d, mean64 - rounded.to(torch.float64)


def backward_sums(grad_y: Tensor, x: Tensor, mean: Tensor) -> tuple[Tensor, Tensor]:
    """The two reductions of the backward around a given per-channel ``mean`` (C,):

        sum_g = sum g,   sum_g_xc = sum g * (x - mean)

    returned in float64. Summed in ``acc_dtype`` around the mean rounded to it (exact near the
    mean), the float64 residual applied per channel: sum g (x - mean) = sum g d - resid sum g.

    Shape: grad_y, x (N, C, *) -> sum_g (C,), sum_g_xc (C,).
    """
    dims = reduce_dims(x)
    g = grad_y.to(acc_dtype(x.dtype))
    d, resid = _centered(x, mean)
    sum_g = g.sum(dim=dims).to(torch.float64)  # (C,)
    sum_g_xc = (g * d).sum(dim=dims).to(torch.float64) - resid * sum_g  # (C,)
    return sum_g, sum_g_xc


def backward_apply(
    grad_y: Tensor,
    x: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Tensor | None,
    mean_g: Tensor,
    mean_gxhat: Tensor,
) -> Tensor:
    """dx from already-reduced means (the training backward with its two means given):

        x_hat = (x - mean) * invstd,   dx = weight * invstd * (g - mean_g - x_hat * mean_gxhat)

    as k1 g + k2 d + k3 with d = x - mean rounded to ``acc_dtype`` and per-channel float64
    coefficients k1 = weight invstd, k2 = -k1 invstd mean_gxhat, k3 = -k1 mean_g - k2 resid.
    Returns dx in x's dtype.

    Shape: grad_y, x (N, C, *); mean, invstd, weight, mean_g, mean_gxhat (C,) -> dx (N, C, *).
    """
    acc = acc_dtype(x.dtype)
    nd = x.dim()
    d, resid = _centered(x, mean)
    inv = invstd.to(torch.float64)
    k1 = inv if weight is None else inv * weight.to(torch.float64)  # (C,)
    k2 = -k1 * inv * mean_gxhat.to(torch.float64)
    k3 = -k1 * mean_g.to(torch.float64) - k2 * resid
    dx = grad_y.to(acc) * channel_view(k1.to(acc), nd)  # (N, C, *)
    dx.addcmul_(d, channel_view(k2.to(acc), nd))
    dx.add_(channel_view(k3.to(acc), nd))
    return dx.to(x.dtype)
