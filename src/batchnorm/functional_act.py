"""``batch_norm_act``: batch norm fused with an invertible activation, saving only the output.

Forward, per channel c (training: batch statistics):

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

Conventions as `batchnorm.batch_norm`: PyTorch momentum, unbiased running_var, eps inside
the root, statistics in >= float32, non-finite batches never update running statistics. The
backward is not itself differentiable (no double backward). Computed by the
``batchnorm::act_train``/``act_backward`` operators (`batchnorm.ops.act`). The memory
saving applies in eager mode on CPU, where the |gamma| guard can read the weights; under
torch.compile, torch.export or on other devices the input is kept as well (no host read).

Shape: input (N, C), (N, C, L), (N, C, H, W) or (N, C, D, H, W) -> output of the same shape,
dtype and memory format.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import _checks
from .functional import check_train_args, is_fx_proxy, normalize_step, update_step
from .ops.act import activation_forward, train_act

__all__ = ["ACTIVATIONS", "GAMMA_GUARD", "batch_norm_act", "act_step", "check_activation", "activation_forward"]

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


def _can_recompute(x: Tensor, weight: Tensor | None, bias: Tensor | None) -> bool:
    """Whether backward may recompute from the output: eager CPU and every |gamma| large enough
    to divide by (see the module docstring). Elsewhere the weights are not read on the host."""
    if weight is None:
        return True
    if torch.compiler.is_compiling() or torch._C._is_tracing() or x.device.type != "cpu" or weight.device.type != "cpu":
        return False
    for t in (x, weight, bias):  # transformed (torch.func) or fake tensors: values not readable here
        if t is not None and (
            torch._C._functorch.is_functorch_wrapped_tensor(t) or isinstance(t, torch._subclasses.FakeTensor)
        ):
            return False
    w = weight.detach().abs().to(torch.float64)
    b = torch.zeros_like(w) if bias is None else bias.detach().abs().to(torch.float64)
    return bool((w >= GAMMA_GUARD * torch.clamp_min(b, 1.0)).all().numpy())  # CPU memory: no device sync


def act_step(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    momentum: float | None,
    eps: float,
    activation: str,
    negative_slope: float,
    alpha: float,
    where: str,
    num_batches_tracked: Tensor | None = None,
    num_batches_skipped: Tensor | None = None,
) -> Tensor:
    """BN + activation on checked arguments (the operator calls behind `batch_norm_act`)."""
    if not training or x.numel() == 0:
        # evaluation (fixed affine map) or empty batch: plain BN, then the activation
        y = normalize_step(
            x, running_mean, running_var, weight, bias, training, momentum, eps, where,
            num_batches_tracked, num_batches_skipped,
        )  # fmt: skip
        return activation_forward(y, activation, negative_slope, alpha, inplace=False)
    recompute = _can_recompute(x, weight, bias)
    z, mean, var = train_act(x, weight, bias, eps, activation, negative_slope, alpha, recompute)
    update_step(x, running_mean, running_var, mean, var, momentum, where, num_batches_tracked, num_batches_skipped)
    return z


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

    Arguments as `batchnorm.batch_norm`, plus ``activation`` ("leaky_relu", "elu" or
    "identity"; "relu" raises ValueError: not invertible), ``negative_slope`` (> 0, leaky) and
    ``alpha`` (> 0, elu). See the module docstring for the formulas and the |gamma| guard.

    Shape: input (N, C, *) -> output of the same shape, dtype and memory format.
    """
    where = "batch_norm_act"
    if not is_fx_proxy(input):
        check_activation(activation, negative_slope, alpha, where)
        input, eps = check_train_args(
            input,
            where,
            training=training,
            eps=eps,
            weight=weight,
            bias=bias,
            running_mean=running_mean,
            running_var=running_var,
        )
        if training:
            momentum = _checks.check_momentum(momentum, where, allow_none=False)  # type: ignore[assignment]
    return act_step(
        input, running_mean, running_var, weight, bias, training, momentum, eps, activation, negative_slope,
        alpha, where,
    )  # fmt: skip
