"""The batch-renorm math on tensors, written once: the limits of the schedule, the factors r
and d, and the affine parameters they fold into (`batchnorm.nn.renorm` calls them).

Ioffe 2017: with the batch statistics mu_B, sigma_B = sqrt(var_B + eps) and the running mu,
sigma,

    r = clip(sigma_B / sigma, 1 / r_max_t, r_max_t)     d = clip((mu_B - mu) / sigma, -d_max_t, d_max_t)
    y = weight * (r * x_hat + d) + bias = (weight * r) * x_hat + (weight * d + bias)

with r and d constants for autograd, and limits that ramp from plain BN (r = 1, d = 0) after a
warm-up:

    r_max_t = 1 + (r_max - 1) * ramp(t, warmup, r_max_steps)     d_max_t = d_max * ramp(t, warmup, d_max_steps)
    ramp(t, a, b) = clip((t - a) / (b - a), 0, 1)                (a step at t > a when b <= a)
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["limits_at", "factors", "folded_affine"]


def limits_at(
    step: Tensor, r_max: float, d_max: float, warmup_steps: int, r_max_steps: int, d_max_steps: int
) -> tuple[Tensor, Tensor]:
    """(r_max_t, d_max_t) at training step ``step`` (0-dim integer tensor, e.g. the layer's
    ``num_batches_tracked``), as float64 0-dim tensors on its device; nothing is read back."""
    t = step.to(torch.float64)
    ramps: list[Tensor] = []
    for end in (r_max_steps, d_max_steps):  # the ramp inline: no Python call per step
        if end <= warmup_steps:  # a step function at the warm-up
            ramps.append((t > warmup_steps).to(torch.float64))
        else:
            ramps.append(((t - warmup_steps) / (end - warmup_steps)).clamp(0.0, 1.0))
    return 1.0 + (r_max - 1.0) * ramps[0], d_max * ramps[1]


def factors(
    mean_b: Tensor, var_b: Tensor, running_mean: Tensor, running_std: Tensor, r_lim: Tensor, d_lim: Tensor, eps: float
) -> tuple[Tensor, Tensor]:
    """(r, d) per channel (C,) from the batch mean (float64) and biased variance ``var_b``, in
    ``var_b``'s dtype; the running statistics are read detached. d is formed in float64, as the
    means are, so a large mean does not cancel."""
    acc = var_b.dtype
    std_b = torch.sqrt(var_b + eps)
    sigma = running_std.detach().to(acc)
    r_t = r_lim.to(acc)
    r = torch.minimum(torch.maximum(std_b / sigma, r_t.reciprocal()), r_t)
    mu = running_mean.detach().to(torch.float64)
    d = torch.minimum(torch.maximum((mean_b - mu) / sigma.to(torch.float64), -d_lim), d_lim).to(acc)
    return r, d


def folded_affine(weight: Optional[Tensor], bias: Optional[Tensor], r: Tensor, d: Tensor) -> tuple[Tensor, Tensor]:
    """The scale ``weight * r`` and shift ``weight * d + bias`` that give y = weight * (r * x_hat
    + d) + bias from one batch-norm call (``weight`` None: 1; ``bias`` None: 0)."""
    if weight is None:
        w = r
        shift = d
    else:
        w = weight * r.to(weight.dtype)
        shift = weight * d.to(weight.dtype)
    if bias is None:
        return w, shift
    return w, shift + bias
