"""TorchScript forms of the layers' forwards (``torch.jit.script``): the same operator calls as
the eager path, written in the subset of Python TorchScript compiles.

A layer's ``forward`` takes this path only under ``torch.jit.is_scripting()``; autograd then
comes from the operators' own registrations. The argument checks of the eager path (Python
messages) are not compiled: a scripted layer is one that already ran, or that the caller
trusts with its input.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import renorm_math

__all__ = ["bn_forward", "ghost_forward", "renorm_forward", "act_forward"]


def _update(
    x: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    num_batches_tracked: Optional[Tensor],
    num_batches_skipped: Optional[Tensor],
    mean: Tensor,
    var: Tensor,
    momentum: Optional[float],
    unbiased: bool,
    where: str,
) -> None:
    if running_mean is not None and running_var is not None:
        tracked = num_batches_tracked if num_batches_tracked is not None else torch.zeros((), dtype=torch.long)
        skipped = num_batches_skipped if num_batches_skipped is not None else torch.zeros((), dtype=torch.long)
        count = x.numel() // x.size(1) if x.size(1) > 0 else 0
        torch.ops.batchnorm.update_running_stats(
            running_mean, running_var, tracked, skipped, mean.detach(), var.detach(), count, momentum, unbiased, where
        )


def bn_forward(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    num_batches_tracked: Optional[Tensor],
    num_batches_skipped: Optional[Tensor],
    training: bool,
    track_running_stats: bool,
    momentum: Optional[float],
    eps: float,
    where: str,
) -> Tensor:
    """BatchNorm*d: ``batchnorm::train`` (+ ``update_running_stats``) or ``batchnorm::eval``."""
    if training or running_mean is None or running_var is None:
        y, mean, var = torch.ops.batchnorm.train(x, weight, bias, eps)
        if training and track_running_stats:
            _update(
                x, running_mean, running_var, num_batches_tracked, num_batches_skipped, mean, var, momentum, True, where
            )
        return y
    return torch.ops.batchnorm.eval(x, running_mean, running_var, weight, bias, eps)


def ghost_forward(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    num_batches_tracked: Optional[Tensor],
    num_batches_skipped: Optional[Tensor],
    track_running_stats: bool,
    momentum: Optional[float],
    eps: float,
    virtual_batch_size: int,
    where: str,
) -> Tensor:
    """GhostBatchNorm*d in training: ``batchnorm::ghost_train``, ``ghost_pool``, one update."""
    y, mean_k, var_k = torch.ops.batchnorm.ghost_train(x, weight, bias, eps, virtual_batch_size)
    if track_running_stats:
        mean, var = torch.ops.batchnorm.ghost_pool(x, mean_k, var_k, virtual_batch_size)
        _update(
            x, running_mean, running_var, num_batches_tracked, num_batches_skipped, mean, var, momentum, True, where
        )
    return y


def renorm_forward(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    running_mean: Tensor,
    running_std: Tensor,
    num_batches_tracked: Tensor,
    num_batches_skipped: Optional[Tensor],
    training: bool,
    momentum: Optional[float],
    eps: float,
    r_max: float,
    d_max: float,
    warmup_steps: int,
    r_max_steps: int,
    d_max_steps: int,
    where: str,
) -> Tensor:
    """BatchRenorm*d: the math of `batchnorm.ops.renorm_math`, as the eager layer."""
    if not training:
        var = running_std.detach().to(torch.float64).square()
        return torch.ops.batchnorm.eval(x, running_mean.detach(), var, weight, bias, 0.0)
    r_lim, d_lim = renorm_math.limits_at(num_batches_tracked, r_max, d_max, warmup_steps, r_max_steps, d_max_steps)
    mean_b, var_b = torch.ops.batchnorm.moments(x.detach())
    r, d = renorm_math.factors(mean_b, var_b, running_mean, running_std, r_lim, d_lim, eps)
    w, b = renorm_math.folded_affine(weight, bias, r, d)
    y, mean, var = torch.ops.batchnorm.train(x, w, b, eps)
    std = torch.sqrt(var + eps)
    _update(x, running_mean, running_std, num_batches_tracked, num_batches_skipped, mean, std, momentum, False, where)
    return y


def act_forward(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    num_batches_tracked: Optional[Tensor],
    num_batches_skipped: Optional[Tensor],
    training: bool,
    track_running_stats: bool,
    momentum: Optional[float],
    eps: float,
    activation: str,
    negative_slope: float,
    alpha: float,
    where: str,
) -> Tensor:
    """BatchNormAct*d: ``batchnorm::act_train`` (+ update) or ``batchnorm::eval`` + activation."""
    if training or running_mean is None or running_var is None:
        z, mean, var = torch.ops.batchnorm.act_train(x, weight, bias, eps, activation, negative_slope, alpha)
        if training and track_running_stats:
            _update(
                x, running_mean, running_var, num_batches_tracked, num_batches_skipped, mean, var, momentum, True, where
            )
        return z
    y = torch.ops.batchnorm.eval(x, running_mean, running_var, weight, bias, eps)
    if activation == "leaky_relu":
        return torch.nn.functional.leaky_relu(y, negative_slope)
    if activation == "elu":
        return torch.nn.functional.elu(y, alpha)
    return y
