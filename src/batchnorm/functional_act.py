"""``batch_norm_act``: batch norm fused with an invertible activation, saving only the output.

Forward, per channel c (training: batch statistics; DESIGN.md):

    y = gamma * x_hat + beta,   x_hat = (x - mu) / sqrt(var + eps)
    z = act(y)        act in {leaky_relu(slope), elu(alpha), identity}

Standard BN followed by an activation keeps two full tensors for backward (x for BN, y for the
activation). Here backward keeps only z (plus per-channel vectors) and recomputes, as In-Place
ABN does (Rota Bulo et al. 2018):

    y     = act^-1(z)       leaky: z >= 0 ? z : z / slope;  elu: z > 0 ? z : log1p(z / alpha)
    dy    = dz * act'(y)    leaky: z > 0 ? 1 : slope;       elu: z > 0 ? 1 : z + alpha
    x_hat = (y - beta) / gamma
    dx    = gamma / sqrt(var + eps) * (dy - mean(dy) - x_hat * mean(dy * x_hat))
    dgamma = sum dy * x_hat,  dbeta = sum dy

Why not ReLU: relu maps every y <= 0 to 0, so y (and x_hat) cannot be recovered from z; the
saved-output trick needs an invertible activation. LeakyReLU with a small slope (default
0.01) is the usual replacement.

The |gamma| guard: x_hat = (y - beta) / gamma loses precision as |gamma| -> 0 (y's rounding
error is divided by gamma) and is impossible at gamma = 0 (y = beta everywhere). Our choice is
an exact fallback, not a clamp: when some channel has ``|gamma| < GAMMA_GUARD * max(1, |beta|)``,
that step also saves x and differentiates the standard way (exact gradients, no memory saving
for that step). A clamp (In-Place ABN's |gamma| + eps) would change the forward or bias the
gradients of exactly those channels.

ELU saturation: for y << 0, z = alpha * (exp(y) - 1) rounds to -alpha and y is recovered only
approximately (clamped to log of the dtype's epsilon); act'(y) ~ exp(y) is then ~0, so such
elements hardly contribute, but their x_hat enters the dx of the channel (In-Place ABN has the
same limitation).

Conventions as :func:`batchnorm.batch_norm`: PyTorch momentum, unbiased running_var, eps inside
the root, statistics in >= float32, non-finite batches never update running statistics. The
backward is not itself differentiable (no double backward).

Shape: input (N, C), (N, C, L), (N, C, H, W) or (N, C, D, H, W) -> output of the same shape,
dtype and memory format.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import _checks
from ._kernels.dispatch import backend_for
from .functional import _batch_norm, _format, update_running_stats, warn_if_skipped

__all__ = ["ACTIVATIONS", "GAMMA_GUARD", "batch_norm_act", "check_activation", "activation_forward"]

ACTIVATIONS = ("leaky_relu", "elu", "identity")
GAMMA_GUARD = 1e-3
"""Channels with |gamma| below GAMMA_GUARD * max(1, |beta|) trigger the exact fallback."""


def check_activation(activation: object, negative_slope: float, alpha: float, where: str) -> str:
    """Validate the activation name and its parameter; ReLU is refused (not invertible)."""
    if not isinstance(activation, str):
        raise TypeError(f"{where}: expected activation to be a string in {ACTIVATIONS}, got {activation!r}")
    if activation == "relu":
        raise ValueError(
            f"{where}: activation 'relu' is not supported: ReLU maps all y <= 0 to 0, so the "
            "normalized input cannot be recomputed from the output; use 'leaky_relu' (e.g. "
            "negative_slope=0.01) or 'elu', or BatchNorm followed by torch.nn.ReLU"
        )
    if activation not in ACTIVATIONS:
        raise ValueError(f"{where}: expected activation in {ACTIVATIONS}, got {activation!r}")
    if activation == "leaky_relu":
        if isinstance(negative_slope, bool) or not isinstance(negative_slope, (int, float)):
            raise TypeError(f"{where}: expected negative_slope to be a float, got {negative_slope!r}")
        if not (math.isfinite(negative_slope) and negative_slope > 0):
            raise ValueError(
                f"{where}: expected negative_slope > 0 (0 is ReLU and a negative slope is not "
                f"monotone: neither is invertible), got {negative_slope}"
            )
    if activation == "elu":
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
            raise TypeError(f"{where}: expected alpha to be a float, got {alpha!r}")
        if not (math.isfinite(alpha) and alpha > 0):
            raise ValueError(f"{where}: expected alpha > 0 for an invertible ELU, got {alpha}")
    return activation


def activation_forward(y: Tensor, activation: str, negative_slope: float, alpha: float, *, inplace: bool) -> Tensor:
    """z = act(y); in place on y when ``inplace`` (y must then not need autograd)."""
    if activation == "leaky_relu":
        return F.leaky_relu_(y, negative_slope) if inplace else F.leaky_relu(y, negative_slope)
    if activation == "elu":
        return F.elu_(y, alpha) if inplace else F.elu(y, alpha)
    return y


def _invert(z: Tensor, activation: str, negative_slope: float, alpha: float) -> tuple[Tensor, Tensor]:
    """(y, act'(y)) recomputed from z = act(y), in z's dtype (which the caller chooses)."""
    if activation == "identity":
        return z, torch.ones_like(z)
    pos = z > 0
    if activation == "leaky_relu":
        y = torch.where(z >= 0, z, z / negative_slope)
        slope = torch.where(pos, torch.ones_like(z), torch.full_like(z, negative_slope))
        return y, slope
    # elu: z <= 0 -> y = log1p(z / alpha), clamped where z rounded to -alpha (saturation)
    tiny = torch.finfo(z.dtype).eps
    ratio = (z / alpha).clamp_min(-1.0 + tiny)
    y = torch.where(pos, z, torch.log1p(ratio))
    slope = torch.where(pos, torch.ones_like(z), z + alpha)
    return y, slope


def _invertible(weight: Tensor | None, bias: Tensor | None) -> bool:
    """True when every |gamma| is large enough to divide by (see the module docstring)."""
    if weight is None:
        return True
    w = weight.detach().abs().to(torch.float64)
    b = torch.zeros_like(w) if bias is None else bias.detach().abs().to(torch.float64)
    return bool((w >= GAMMA_GUARD * torch.clamp_min(b, 1.0)).all())


class _BatchNormActTrain(torch.autograd.Function):
    """z, mean, var = act(BN_train(x, weight, bias)); saves z (not x) when gamma is invertible."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        eps: float,
        activation: str,
        negative_slope: float,
        alpha: float,
    ) -> tuple[Tensor, Tensor, Tensor]:
        y, mean, var = backend_for(x).train_forward(x, weight, bias, eps)
        z = activation_forward(y, activation, negative_slope, alpha, inplace=True)
        invstd = torch.rsqrt(var + eps)
        ctx.recompute = _invertible(weight, bias)
        ctx.act = (activation, negative_slope, alpha)
        ctx.has_weight = weight is not None
        ctx.has_bias = bias is not None
        if ctx.recompute:
            ctx.save_for_backward(z, weight, bias, invstd)
        else:
            ctx.save_for_backward(z, weight, bias, invstd, x, mean)
        ctx.mark_non_differentiable(mean, var)
        return z, mean, var

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_z: Tensor, _gmean: Tensor, _gvar: Tensor):  # type: ignore[override]
        z, weight, bias, invstd, *rest = ctx.saved_tensors
        acc = invstd.dtype
        if ctx.recompute and ctx.act[0] != "identity" and backend_for(z).__name__.endswith(".cpu"):
            # numba: inversion, activation backward and BN backward fused, nothing stored
            from ._kernels import cpu_act

            dx, dw, db = cpu_act.backward_act(grad_z, z, weight, bias, invstd, *ctx.act)
            return _grads(ctx, dx, dw, db, z, weight, bias)
        y, slope = _invert(z.to(acc), *ctx.act)
        dy = grad_z.to(acc) * slope
        if ctx.recompute:
            # BN backward in the variables of y: x_hat = (y - beta) * (1 / gamma); the kernel's
            # dx scale weight' * invstd' must equal gamma * invstd, so weight' = gamma^2 * invstd
            gamma = torch.ones_like(invstd) if weight is None else weight.detach().to(acc)
            beta = torch.zeros_like(invstd) if bias is None else bias.detach().to(acc)
            dy = dy.contiguous(memory_format=_format(y))
            dx, dw, db = backend_for(y).backward(dy, y, beta, 1.0 / gamma, gamma * gamma * invstd)
        else:
            x, mean = rest
            dy = dy.to(x.dtype).contiguous(memory_format=_format(x))
            dx, dw, db = backend_for(x).backward(dy, x, mean, invstd, weight)
        return _grads(ctx, dx, dw, db, z, weight, bias)


def _grads(ctx, dx: Tensor, dw: Tensor, db: Tensor, z: Tensor, weight: Tensor | None, bias: Tensor | None):
    """The gradient tuple of ``_BatchNormActTrain.backward``, None where not needed."""
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    return (
        dx.to(z.dtype) if need_x else None,
        dw.to(weight.dtype) if (need_w and ctx.has_weight) else None,
        db.to(bias.dtype) if (need_b and ctx.has_bias) else None,
        None,
        None,
        None,
        None,
    )


def _batch_norm_act(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
    activation: str,
    negative_slope: float,
    alpha: float,
    where: str,
) -> tuple[Tensor, bool | None]:
    """The work behind :func:`batch_norm_act`; also returns whether running stats were updated."""
    check_activation(activation, negative_slope, alpha, where)
    if not training or input.numel() == 0:
        # evaluation (fixed affine map) or empty batch: plain BN, then the activation
        y, updated = _batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps, where)
        return activation_forward(y, activation, negative_slope, alpha, inplace=False), updated
    x, eps = _checks.check_args(
        input,
        where,
        training=True,
        eps=eps,
        weight=weight,
        bias=bias,
        running_mean=running_mean,
        running_var=running_var,
    )
    c = x.shape[1]
    momentum = _checks.check_momentum(momentum, where, allow_none=False)  # type: ignore[assignment]
    _checks.check_batch_size(x, where)
    z, mean, var = _BatchNormActTrain.apply(x, weight, bias, eps, activation, negative_slope, alpha)
    if running_mean is None:
        return z, None
    return z, update_running_stats(running_mean, running_var, mean, var, x.numel() // c, momentum)


def batch_norm_act(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    activation: str = "leaky_relu",
    negative_slope: float = 0.01,
    alpha: float = 1.0,
) -> Tensor:
    """``act(batch_norm(input, ...))`` with a backward that keeps only the output.

    Arguments as :func:`batchnorm.batch_norm`, plus ``activation`` ("leaky_relu", "elu" or
    "identity"; "relu" raises ValueError: not invertible), ``negative_slope`` (> 0, leaky) and
    ``alpha`` (> 0, elu). See the module docstring for the formulas and the |gamma| guard.

    Shape: input (N, C, *) -> output of the same shape, dtype and memory format.
    """
    z, updated = _batch_norm_act(
        input,
        running_mean,
        running_var,
        weight,
        bias,
        training,
        momentum,
        eps,
        activation,
        negative_slope,
        alpha,
        "batch_norm_act",
    )
    warn_if_skipped(updated, input, "batch_norm_act")
    return z

