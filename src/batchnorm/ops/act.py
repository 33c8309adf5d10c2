"""Batch norm + invertible activation operators: ``torch.ops.batchnorm.{act_train, act_backward}``.

    z = act(weight * x_hat + bias),   act in {leaky_relu(slope), elu(alpha), identity}

``act_train`` returns (z, mean, var). ``act_backward`` computes (dx, dweight, dbias) from the
output z alone (the memory-saving path: y = act^-1(z), x_hat = (y - bias) / weight, see
`batchnorm.functional_act`). When the input must be kept instead (a |weight| too small to
divide by, or a trace where that cannot be decided on the host), the gradient goes through
``dy = dz * act'(y)`` and `batchnorm.ops.bn.train_backward` with x.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .._kernels.dispatch import backend_for
from ._common import acc_dtype, fresh, per_channel, register_channel_vmap
from ._path import apply, eager, eager_backward, forward_ad_active, needs_grad
from .bn import _train_backward_impl, _train_with, memory_format_of, train_backward, train_jvp

_c = torch._C

__all__ = ["act_train", "act_backward", "activation_forward", "invert_activation", "train_act"]


def activation_forward(y: Tensor, activation: str, negative_slope: float, alpha: float, *, inplace: bool) -> Tensor:
    """z = act(y); in place on y when ``inplace`` (y must then not need autograd)."""
    if activation == "leaky_relu":
        return F.leaky_relu_(y, negative_slope) if inplace else F.leaky_relu(y, negative_slope)
    if activation == "elu":
        return F.elu_(y, alpha) if inplace else F.elu(y, alpha)
    return y


def invert_activation(z: Tensor, activation: str, negative_slope: float, alpha: float) -> tuple[Tensor, Tensor]:
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


def _act_train_impl(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    activation: str,
    negative_slope: float,
    alpha: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """(z, mean, var): the training forward of batch norm, then the activation in place."""
    y, mean, var = _train_with(backend_for(x), x, weight, bias, eps)
    z = activation_forward(y, activation, negative_slope, alpha, inplace=True)
    return z, mean, var


def _act_train_op(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    activation: str,
    negative_slope: float,
    alpha: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """`_act_train_impl` as an operator implementation: no output aliases an input."""
    return fresh(_act_train_impl(x, weight, bias, eps, activation, negative_slope, alpha), (x, weight, bias))


act_train = torch.library.custom_op("batchnorm::act_train", _act_train_op, mutates_args=())


@act_train.register_fake
def _act_train_fake(x, weight, bias, eps, activation, negative_slope, alpha):
    y = torch.empty_like(x, memory_format=memory_format_of(x))
    return y, per_channel(x, torch.float64), per_channel(x, acc_dtype(x.dtype))


register_channel_vmap(act_train, "xcc----", "xcc")


def _act_backward_impl(
    grad_z: Tensor,
    z: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    var: Tensor,
    eps: float,
    activation: str,
    negative_slope: float,
    alpha: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias) from the output z only; ``weight`` must be invertible."""
    invstd = torch.rsqrt(var + eps)
    acc = invstd.dtype
    module = backend_for(z)
    if activation != "identity" and module.__name__.endswith(".cpu"):
        # numba: inversion, activation backward and BN backward fused, nothing stored
        from .._kernels import cpu_act

        dx, dw, db = cpu_act.backward_act(grad_z, z, weight, bias, invstd, activation, negative_slope, alpha)
        return fresh((dx.to(z.dtype), dw, db), (grad_z, z, weight, bias, var))
    y, slope = invert_activation(z.to(acc), activation, negative_slope, alpha)
    dy = (grad_z.to(acc) * slope).contiguous(memory_format=memory_format_of(z))
    # BN backward in the variables of y: x_hat = (y - beta) * (1 / gamma); the kernel's dx
    # scale weight' * invstd' must equal gamma * invstd, so weight' = gamma^2 * invstd
    gamma = torch.ones_like(invstd) if weight is None else weight.to(acc)
    beta = torch.zeros_like(invstd) if bias is None else bias.to(acc)
    kernels = module if y.dtype == z.dtype else backend_for(y)
    dx, dw, db = kernels.backward(dy, y, beta, gamma.reciprocal(), gamma * gamma * invstd)
    return fresh((dx.to(z.dtype), dw, db), (grad_z, z, weight, bias, var))


act_backward = torch.library.custom_op("batchnorm::act_backward", _act_backward_impl, mutates_args=())


@act_backward.register_fake
def _act_backward_fake(grad_z, z, weight, bias, var, eps, activation, negative_slope, alpha):
    acc = acc_dtype(z.dtype)
    return torch.empty_like(z, memory_format=memory_format_of(z)), per_channel(z, acc), per_channel(z, acc)


register_channel_vmap(act_backward, "xxccc----", "xcc")


def _act_setup(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor, Tensor]) -> None:
    x, weight, bias, eps, activation, negative_slope, alpha = inputs
    z, mean, var = output
    ctx.act = (activation, negative_slope, alpha)
    ctx.eps = eps
    ctx.dtypes = (None if weight is None else weight.dtype, None if bias is None else bias.dtype)
    ctx.save_for_backward(z, weight, var, x, mean)


def _act_grads(ctx: Any, grad_z: Tensor, _gm: Any, _gv: Any):
    """The operator's own autograd (for callers of ``torch.ops.batchnorm.act_train`` itself):
    dy = dz * act'(y) with y recovered from z, then the BN backward with the saved x."""
    z, weight, var, x, mean = ctx.saved_tensors
    _, slope = invert_activation(z.to(var.dtype), *ctx.act)
    dy = (grad_z.to(var.dtype) * slope).to(x.dtype)
    dx, dw, db = train_backward(dy, x, weight, mean, var, ctx.eps)
    w_dtype, b_dtype = ctx.dtypes
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    return (
        dx if need_x else None,
        dw.to(w_dtype) if need_w and w_dtype is not None else None,
        db.to(b_dtype) if need_b and b_dtype is not None else None,
        None,
        None,
        None,
        None,
    )


act_train.register_autograd(_act_grads, setup_context=_act_setup)


class _ActTrain(torch.autograd.Function):
    """(z, mean, var) = act_train(x, ...); saves z, and x too unless ``recompute``."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, weight, bias, eps, activation, negative_slope, alpha, recompute):  # type: ignore[override]
        return act_train(x, weight, bias, eps, activation, negative_slope, alpha)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor, Tensor]) -> None:
        x, weight, bias, eps, activation, negative_slope, alpha, recompute = inputs[:8]
        z, mean, var = output
        ctx.recompute = recompute
        ctx.act = (activation, negative_slope, alpha)
        ctx.eps = eps
        ctx.dtypes = (None if weight is None else weight.dtype, None if bias is None else bias.dtype)
        if recompute:
            ctx.save_for_backward(z, weight, bias, var)
        else:
            ctx.save_for_backward(z, weight, bias, var, x, mean)
        ctx.mark_non_differentiable(mean, var)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_z: Tensor, _gm: Tensor, _gv: Tensor):  # type: ignore[override]
        return _act_grads_eager(ctx, grad_z)


def _act_grads_eager(ctx: Any, grad_z: Tensor) -> tuple[Tensor | None, ...]:
    """(dx, dweight, dbias, None x 5) of `_ActTrain`: from z alone when ``recompute``,
    else through act'(y) and the BN backward with the saved x."""
    z, weight, bias, var, *rest = ctx.saved_tensors
    eager_path = getattr(ctx, "direct", False)
    if ctx.recompute:
        act_bwd = _act_backward_impl if eager_path else act_backward
        dx, dw, db = act_bwd(grad_z, z, weight, bias, var, ctx.eps, *ctx.act)
    else:
        x, mean = rest
        _, slope = invert_activation(z.to(var.dtype), *ctx.act)
        dy = (grad_z.to(var.dtype) * slope).to(x.dtype)
        bn_bwd = _train_backward_impl if eager_path else train_backward
        dx, dw, db = bn_bwd(dy, x, weight, mean, var, ctx.eps)
    w_dtype, b_dtype = ctx.dtypes
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    return (
        dx if need_x else None,
        dw.to(w_dtype) if need_w and w_dtype is not None else None,
        db.to(b_dtype) if need_b and b_dtype is not None else None,
        None,
        None,
        None,
        None,
        None,
    )


class _ActTrainEager(_ActTrain):
    """`_ActTrain` on the eager path (an extra last argument marks it): the
    implementations run directly, forward and backward."""

    @staticmethod
    def forward(x, weight, bias, eps, activation, negative_slope, alpha, recompute, _eager):  # type: ignore[override]
        return _act_train_impl(x, weight, bias, eps, activation, negative_slope, alpha)

    @staticmethod
    def backward(ctx: Any, grad_z: Tensor, gm: Tensor, gv: Tensor):  # type: ignore[override]
        if _c.is_grad_enabled():  # create_graph: the once-differentiable backward says so
            return (*_ActTrain.backward(ctx, grad_z, gm, gv), None)
        ctx.direct = eager_backward(grad_z)
        return (*_act_grads_eager(ctx, grad_z), None)


class _ActTrainForwardAD(_ActTrain):
    """`_ActTrain` with a forward-mode rule: dz = act'(y) * dy, dy the BN forward-mode
    derivative (`batchnorm.ops.bn._TrainForwardAD`)."""

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor, Tensor]) -> None:
        _ActTrain.setup_context(ctx, inputs, output)
        ctx.save_for_forward(inputs[0], inputs[1], output[0], output[1], output[2])

    @staticmethod
    def jvp(ctx: Any, tx, tw, tb, *_rest):  # type: ignore[override]
        x, weight, z, mean, var = ctx.saved_tensors
        ty = train_jvp(x, weight, mean, var, ctx.eps, tx, tw, tb)
        if ty is None:
            return None, None, None
        _, slope = invert_activation(z.to(var.dtype), *ctx.act)
        return (ty.to(var.dtype) * slope).to(z.dtype), None, None


def train_act(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    activation: str,
    negative_slope: float,
    alpha: float,
    recompute: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Differentiable BN + activation training forward: (z, mean, var). ``recompute``: backward
    from z alone (weight invertible), else from x."""
    if eager(x, weight, bias):
        if needs_grad(x, weight, bias):
            return apply(_ActTrainEager, x, weight, bias, eps, activation, negative_slope, alpha, recompute, True)
        return _act_train_impl(x, weight, bias, eps, activation, negative_slope, alpha)
    fn = _ActTrainForwardAD if forward_ad_active() else _ActTrain
    return fn.apply(x, weight, bias, eps, activation, negative_slope, alpha, recompute)
