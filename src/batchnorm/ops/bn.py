"""The batch-norm operators: ``torch.ops.batchnorm.{train, train_backward, eval, moments, update_running_stats}``.

Math (per channel c over the m = N * prod(spatial) values of x[:, c]):

    mean = (1/m) sum x,   var = (1/m) sum (x - mean)^2            (biased)
    y    = weight * (x - mean) / sqrt(var + eps) + bias            (train: batch statistics)
    y    = weight * (x - r_mean) / sqrt(r_var + eps) + bias         (eval: given statistics)

Backward of train (g = dL/dy, x_hat = (x - mean) / sqrt(var + eps)):

    dbias = sum g,  dweight = sum g * x_hat,
    dx    = weight / sqrt(var + eps) * (g - mean(g) - x_hat * mean(g * x_hat))

Forward-mode derivative of train: the same map applied to the tangent (the Jacobian of
x -> x_hat is symmetric), dy = weight * J(dx) + dweight * x_hat + dbias.

Each operator has one implementation for every device that asks the kernel dispatcher
(`batchnorm._kernels.dispatch.backend_for`) for the back-end of its input (numba kernels
on CPU, aten's native kernels on CUDA, pure torch elsewhere), a fake implementation (shapes and
dtypes only: torch.compile, torch.export and meta tensors never run a kernel), a batching rule
for ``torch.vmap`` (B problems of C channels are one problem of B*C channels), and autograd.
Statistics are returned as mean in float64 and var in float32 (float64 for float64 input).

The Python entry points `train_step` (forward and running-statistics update),
`train_forward`, `eval_forward`, `moments` and `update_running_stats_`
are what the layers call. Each decides its path once (`batchnorm.ops._path`): on the eager
path aten's kernels with aten's autograd (small float32/float64 CPU inputs,
`batchnorm._kernels.dispatch.aten_direct`) or the back-end's kernels in an
``autograd.Function``; under torch.compile torch ops that Inductor fuses; everywhere else the
operators through ``torch.autograd.Function``s (setup_context style, so
``torch.func.grad``/``jacrev``/``vmap`` work), with a forward-mode rule (``jvp``,
``torch.autograd.forward_ad``). The operators also carry their own autograd registration, for
callers that use ``torch.ops.batchnorm.*`` directly.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .._kernels import native, step_ext, torch_ops
from .._kernels.dispatch import aten_direct, backend_for
from . import inductor
from ._common import acc_dtype, fresh, per_channel, register_channel_vmap
from ._path import apply, compiling_not_exporting, eager, forward_ad_active, needs_grad, recomputing
from .aten_step import EXT, eval_aten, train_aten
from .update import (
    _update,
    update_eager,
    update_running_stats,
)

_c = torch._C

__all__ = [
    "train",
    "train_backward",
    "eval_bn",
    "moments_op",
    "train_forward",
    "eval_forward",
    "moments",
    "train_step",
    "memory_format_of",
]


def memory_format_of(x: Tensor) -> torch.memory_format:
    """channels_last(_3d) when x is laid out that way (and not also contiguous), else contiguous."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if x.dim() == 5 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


def _view(v: Tensor, ndim: int) -> Tensor:
    """(C,) -> (1, C, 1, ..., 1) for broadcasting against an ndim-dimensional input."""
    return v.reshape(1, -1, *([1] * (ndim - 2)))


# ---------------------------------------------------------------------------------------------
# train: (y, mean, var) from x


def _train_impl(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """Training forward: y, the batch mean (C,) float64 and the biased batch variance (C,)."""
    return fresh(_train_with(backend_for(x), x, weight, bias, eps), (x, weight, bias))


def _train_with(
    kernels: Any, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    if x.numel() == 0:
        c = x.shape[1]
        return torch.empty_like(x), x.new_zeros(c, dtype=torch.float64), x.new_zeros(c, dtype=acc_dtype(x.dtype))
    y, mean, var = kernels.train_forward(x, weight, bias, eps)
    if mean.dtype != torch.float64:
        mean = mean.to(torch.float64)
    return y, mean, var


train = torch.library.custom_op("batchnorm::train", _train_impl, mutates_args=())


@train.register_fake
def _train_fake(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    y = torch.empty_like(x, memory_format=memory_format_of(x))
    return y, per_channel(x, torch.float64), per_channel(x, acc_dtype(x.dtype))


register_channel_vmap(train, "xcc-", "xcc")


def _train_backward_impl(
    grad_y: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor, var: Tensor, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Backward of `train`: (dx, dweight, dbias), the per-channel sums in float32/float64."""
    return fresh(
        _train_backward_with(backend_for(x), grad_y, x, weight, mean, var, eps), (grad_y, x, weight, mean, var)
    )


def _train_backward_with(
    kernels: Any, grad_y: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor, var: Tensor, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    if x.numel() == 0:
        c = x.shape[1]
        z = x.new_zeros(c, dtype=acc_dtype(x.dtype))
        return torch.empty_like(x), z, z.clone()
    invstd = torch.rsqrt(var + eps)
    if not grad_y.is_contiguous() or not x.is_contiguous():
        grad_y = grad_y.contiguous(memory_format=torch.contiguous_format if x.is_contiguous() else memory_format_of(x))
    return kernels.backward(grad_y, x, mean, invstd, weight)


train_backward = torch.library.custom_op("batchnorm::train_backward", _train_backward_impl, mutates_args=())


@train_backward.register_fake
def _train_backward_fake(
    grad_y: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor, var: Tensor, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    acc = acc_dtype(x.dtype)
    return torch.empty_like(x, memory_format=memory_format_of(x)), per_channel(x, acc), per_channel(x, acc)


register_channel_vmap(train_backward, "xxccc-", "xcc")


def _train_setup(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor, Tensor]) -> None:
    x, weight, bias, eps = inputs[:4]
    _, mean, var = output
    ctx.save_for_backward(x, weight, mean, var)
    ctx.eps = eps
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.kernels = inputs[4] if len(inputs) > 4 else None  # the eager path's back-end, chosen once
    ctx.mark_non_differentiable(mean, var)


def _train_grads(ctx: Any, grad_y: Tensor, _gm: Tensor | None, _gv: Tensor | None, direct: bool = True):
    x, weight, mean, var = ctx.saved_tensors
    if grad_y is None:
        return None, None, None, None
    if torch.is_grad_enabled():
        # create_graph=True: recompute the statistics differentiably and differentiate the
        # backward formula itself (gradient penalties, double backward)
        if x.numel() == 0:
            # an empty batch has no statistics (NaN), which would reach the second derivatives
            # through sums over no values: with 0 and 1 every derivative is zero or empty, as torch's
            acc = acc_dtype(x.dtype)
            mean2, var2 = x.new_zeros(x.shape[1], dtype=acc), x.new_ones(x.shape[1], dtype=acc)
        else:
            mean2, var2 = torch_ops.batch_stats(x)
        dx, dw, db = torch_ops.backward(grad_y, x, mean2, torch.rsqrt(var2 + ctx.eps), weight)
    elif ctx.kernels is not None and direct:
        dx, dw, db = _train_backward_with(ctx.kernels, grad_y, x, weight, mean, var, ctx.eps)
    else:
        dx, dw, db = train_backward(grad_y, x, weight, mean, var, ctx.eps)
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    return (
        dx if need_x else None,
        dw.to(weight.dtype) if need_w and weight is not None else None,
        db.to(ctx.bias_dtype) if need_b and ctx.bias_dtype is not None else None,
        None,
    )


train.register_autograd(_train_grads, setup_context=_train_setup)


class _Train(torch.autograd.Function):
    """(y, mean, var) = train(x, weight, bias, eps) through the dispatcher; mean and var are
    not differentiable."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> tuple[Tensor, Tensor, Tensor]:  # type: ignore[override]
        return train(x, weight, bias, eps)

    setup_context = staticmethod(_train_setup)

    @staticmethod
    def backward(ctx: Any, grad_y: Tensor, gm: Tensor, gv: Tensor):  # type: ignore[override]
        return _train_grads(ctx, grad_y, gm, gv)


class _TrainEager(_Train):
    """`_Train` on the eager path: the kernels of back-end ``kernels`` (the last
    argument) run directly, forward and backward."""

    @staticmethod
    def forward(x, weight, bias, eps, kernels):  # type: ignore[override]
        return _train_with(kernels, x, weight, bias, eps)

    @staticmethod
    def backward(ctx: Any, grad_y: Tensor, gm: Tensor, gv: Tensor):  # type: ignore[override]
        if (  # eager_backward, inline: this runs on every small training step
            grad_y is None
            or grad_y.__class__ is not Tensor
            or not _c._has_storage(grad_y)
            or _c.is_grad_enabled()
            or _c._are_functorch_transforms_active()
            or _c._len_torch_dispatch_stack() > 0
        ):
            # through the operator (batching rule) or the differentiable composite
            return (*_train_grads(ctx, grad_y, gm, gv, direct=False), None)
        x, weight, mean, var = ctx.saved_tensors
        dx, dw, db = _train_backward_with(ctx.kernels, grad_y, x, weight, mean, var, ctx.eps)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        return (
            dx if need_x else None,
            dw.to(weight.dtype) if need_w and weight is not None else None,
            db.to(ctx.bias_dtype) if need_b and ctx.bias_dtype is not None else None,
            None,
            None,
        )


class _TrainForwardAD(_Train):
    """`_Train` with a forward-mode rule (used where torch.compile is not tracing)."""

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor, Tensor]) -> None:
        _train_setup(ctx, inputs, output)
        x, weight, bias, _ = inputs
        ctx.save_for_forward(x, weight, output[1], output[2])

    @staticmethod
    def jvp(ctx: Any, tx: Tensor | None, tw: Tensor | None, tb: Tensor | None, _te: Any):  # type: ignore[override]
        x, weight, mean, var = ctx.saved_tensors
        return train_jvp(x, weight, mean, var, ctx.eps, tx, tw, tb), None, None


def train_jvp(
    x: Tensor,
    weight: Tensor | None,
    mean: Tensor,
    var: Tensor,
    eps: float,
    tx: Tensor | None,
    tw: Tensor | None,
    tb: Tensor | None,
) -> Tensor | None:
    """The forward-mode derivative of train's y along tangents (tx, tweight, tbias) (None: zero)."""
    nd = x.dim()
    ty = None
    if tx is not None:  # d x_hat = J(dx): the backward map with weight 1 applied to the tangent
        ty, _, _ = train_backward(tx, x, None, mean, var, eps)
        if weight is not None:
            ty = ty * _view(weight, nd)
    if tw is not None or tb is not None:
        acc = acc_dtype(x.dtype)
        extra = torch.zeros((), dtype=acc, device=x.device)
        if tw is not None:
            x_hat = torch_ops.center(x, mean) * _view(torch.rsqrt(var + eps).to(acc), nd)
            extra = extra + x_hat * _view(tw.to(acc), nd)
        if tb is not None:
            extra = extra + _view(tb.to(acc), nd)
        ty = extra.to(x.dtype) if ty is None else ty + extra.to(x.dtype)
    return ty


def train_step(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    num_batches_tracked: Tensor,
    num_batches_skipped: Tensor,
    momentum: float | None,
    eps: float,
    where: str,
) -> Tensor:
    """A training step of batch norm on checked arguments: y from the batch statistics and, when
    ``running_mean``/``running_var`` are given, their update in place (`_update_impl`'s rule).
    The path (`batchnorm.ops._path`) is decided once for both. A forward recomputed by
    activation checkpointing (`batchnorm.ops._path.recomputing`) normalizes with the same
    batch statistics and does not update again."""
    if eager(x, weight, bias):
        if aten_direct(x):
            y = train_aten(x, weight, bias, running_mean, running_var, num_batches_tracked, num_batches_skipped, momentum, eps, where)  # fmt: skip
            if y is not None:
                return y
        count = x.numel() // x.shape[1] if x.shape[1] else 0
        kernels = backend_for(x)
        if _c.is_grad_enabled() and (x.requires_grad or (weight is not None and weight.requires_grad) or (bias is not None and bias.requires_grad)):  # fmt: skip
            y, mean, var = apply(_TrainEager, x, weight, bias, eps, kernels)
        else:
            y, mean, var = _train_with(kernels, x, weight, bias, eps)
        if running_mean is not None and running_var is not None:
            update_eager(
                running_mean, running_var, num_batches_tracked, num_batches_skipped, mean, var, count, momentum, where
            )
        return y
    count = x.numel() // x.shape[1] if x.shape[1] else 0
    if compiling_not_exporting():
        # torch.compile: our math as torch ops, which Inductor fuses with the neighbours (an opaque
        # operator cannot be); torch.export keeps the operator node (tools read it back)
        y, mean, var = inductor.train_forward(x, weight, bias, eps)
        if running_mean is not None and running_var is not None:
            with torch.no_grad():
                state = (running_mean, running_var, num_batches_tracked, num_batches_skipped)
                _update(*state, mean.detach(), var.detach(), count, momentum, True)
        return y
    y, mean, var = (_TrainForwardAD if forward_ad_active() else _Train).apply(x, weight, bias, eps)
    if running_mean is not None and running_var is not None and not recomputing():
        with torch.no_grad():
            state = (running_mean, running_var, num_batches_tracked, num_batches_skipped)
            update_running_stats(*state, mean.detach(), var.detach(), count, momentum, True, where)
    return y


def train_forward(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """Differentiable training forward: (y, mean float64 (C,), biased var (C,)); see the module
    docstring, and `batchnorm.ops._path` for the path a call takes."""
    if eager(x, weight, bias):
        kernels = backend_for(x)
        if needs_grad(x, weight, bias):
            return apply(_TrainEager, x, weight, bias, eps, kernels)
        return _train_with(kernels, x, weight, bias, eps)
    fn = _TrainForwardAD if forward_ad_active() else _Train
    return fn.apply(x, weight, bias, eps)


# ---------------------------------------------------------------------------------------------
# eval: y from x and given statistics


def _eval_impl(x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    """Inference forward with fixed statistics: y = weight * (x - mean) / sqrt(var + eps) + bias."""
    return fresh((_eval_with(backend_for(x), x, mean, var, weight, bias, eps),), (x, mean, var, weight, bias))[0]


def _eval_with(
    kernels: Any, x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> Tensor:
    if x.numel() == 0:
        return torch.empty_like(x)
    return kernels.eval_forward(x, mean, var, weight, bias, eps)


eval_bn = torch.library.custom_op("batchnorm::eval", _eval_impl, mutates_args=())


@eval_bn.register_fake
def _eval_fake(x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    return torch.empty_like(x, memory_format=memory_format_of(x))


register_channel_vmap(eval_bn, "xcccc-", "x")


def _eval_setup(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    x, mean, var, weight, bias, eps = inputs[:6]
    ctx.save_for_backward(x, mean, var, weight)
    ctx.eps = eps
    ctx.bias_dtype = None if bias is None else bias.dtype


def _eval_grads(ctx: Any, grad_y: Tensor):
    """dx = g * weight * invstd,  dweight = sum g * x_hat,  dbias = sum g,
    dmean = -sum g * weight * invstd,  dvar = -sum g * weight * x_hat * invstd^2 / 2
    (differentiable torch ops)."""
    x, mean, var, weight = ctx.saved_tensors
    need_x, need_m, need_v, need_w, need_b = ctx.needs_input_grad[:5]
    acc = acc_dtype(x.dtype)
    nd = x.dim()
    dims = torch_ops.reduce_dims(x)
    invstd = torch.rsqrt(var.to(acc) + ctx.eps)
    g = grad_y.to(acc)
    scale = invstd if weight is None else invstd * weight.to(acc)
    dx = dm = dv = dw = db = None
    if need_x:
        dx = (g * _view(scale, nd)).to(x.dtype)
    x_hat = torch_ops.center(x, mean) * _view(invstd, nd) if (need_w or need_v) else None
    if need_m:
        dm = (-(g.sum(dim=dims)) * scale).to(mean.dtype)
    if need_v:
        dv = (-0.5 * (g * x_hat).sum(dim=dims) * scale * invstd).to(var.dtype)
    if need_w and weight is not None:
        dw = (g * x_hat).sum(dim=dims).to(weight.dtype)
    if need_b and ctx.bias_dtype is not None:
        db = g.sum(dim=dims).to(ctx.bias_dtype)
    return dx, dm, dv, dw, db, None


eval_bn.register_autograd(_eval_grads, setup_context=_eval_setup)


class _Eval(torch.autograd.Function):
    """y = eval(x, mean, var, weight, bias, eps), differentiable in x, weight and bias."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, mean, var, weight, bias, eps):  # type: ignore[override]
        return eval_bn(x, mean, var, weight, bias, eps)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        _eval_setup(ctx, inputs, output)

    @staticmethod
    def backward(ctx: Any, grad_y: Tensor):  # type: ignore[override]
        return _eval_grads(ctx, grad_y)


class _EvalEager(_Eval):
    """`_Eval` on the eager path: back-end ``kernels`` (the last argument) runs directly."""

    @staticmethod
    def forward(x, mean, var, weight, bias, eps, kernels):  # type: ignore[override]
        return _eval_with(kernels, x, mean, var, weight, bias, eps)

    @staticmethod
    def backward(ctx: Any, grad_y: Tensor):  # type: ignore[override]
        return (*_eval_grads(ctx, grad_y), None)


class _EvalForwardAD(_Eval):
    """`_Eval` with a forward-mode rule: dy = dx * weight * invstd + dweight * x_hat + dbias."""

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        _eval_setup(ctx, inputs, output)
        x, mean, var, weight, _, _ = inputs
        ctx.save_for_forward(x, mean, var, weight)

    @staticmethod
    def jvp(ctx: Any, tx, tm, tv, tw, tb, _te):  # type: ignore[override]
        x, mean, var, weight = ctx.saved_tensors
        acc = acc_dtype(x.dtype)
        nd = x.dim()
        invstd = torch.rsqrt(var.to(acc) + ctx.eps)
        scale = invstd if weight is None else invstd * weight.to(acc)
        ty = torch.zeros((), dtype=acc, device=x.device)
        if tx is not None:
            ty = ty + tx.to(acc) * _view(scale, nd)
        if tm is not None:
            ty = ty - _view(tm.to(acc) * scale, nd)
        if tv is not None:
            x_hat = torch_ops.center(x, mean) * _view(invstd, nd)
            ty = ty - x_hat * _view(0.5 * tv.to(acc) * scale * invstd, nd)
        if tw is not None:
            ty = ty + torch_ops.center(x, mean) * _view(invstd * tw.to(acc), nd)
        if tb is not None:
            ty = ty + _view(tb.to(acc), nd)
        return ty.to(x.dtype).expand_as(x).contiguous(memory_format=memory_format_of(x))


def eval_forward(
    x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> Tensor:
    """Differentiable inference forward with fixed statistics (C,) ``mean`` and ``var``."""
    if eager(x, mean, var, weight, bias):
        if aten_direct(x):
            ext = EXT["module"] if "module" in EXT else EXT.setdefault("module", step_ext.load())
            if ext is not None:
                y = ext.eval_step(x, weight, bias, mean, var, eps, native.KAPPA_MAX.get(x.dtype, 0.0))
            else:
                y = eval_aten(x, mean, var, weight, bias, eps)
            if y is not None:
                return y  # type: ignore[no-any-return]
        kernels = backend_for(x)
        if needs_grad(x, mean, var, weight, bias):
            return apply(_EvalEager, x, mean, var, weight, bias, eps, kernels)
        return _eval_with(kernels, x, mean, var, weight, bias, eps)
    if compiling_not_exporting():  # as in train_step: torch ops that Inductor fuses
        return torch_ops.eval_forward(x, mean, var, weight, bias, eps)
    fn = _EvalForwardAD if forward_ad_active() else _Eval
    return fn.apply(x, mean, var, weight, bias, eps)


# ---------------------------------------------------------------------------------------------
# moments: (mean, var) of x, no output


def _moments_impl(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel batch mean (float64) and biased variance (float32/float64) of x (N, C, *)."""
    if x.numel() == 0:
        c = x.shape[1]
        return x.new_zeros(c, dtype=torch.float64), x.new_zeros(c, dtype=acc_dtype(x.dtype))
    mean, var = backend_for(x).batch_stats(x)
    return mean.to(torch.float64), var


def _moments_op(x: Tensor) -> tuple[Tensor, Tensor]:
    """`_moments_impl` as an operator implementation: no output aliases the input."""
    return fresh(_moments_impl(x), (x,))


moments_op = torch.library.custom_op("batchnorm::moments", _moments_op, mutates_args=())


@moments_op.register_fake
def _moments_fake(x: Tensor) -> tuple[Tensor, Tensor]:
    return per_channel(x, torch.float64), per_channel(x, acc_dtype(x.dtype))


register_channel_vmap(moments_op, "x", "cc")


def moments(x: Tensor) -> tuple[Tensor, Tensor]:
    """(mean float64 (C,), biased var (C,)) of x, not differentiable (statistics only)."""
    x = x.detach()
    return _moments_impl(x) if eager(x) else moments_op(x)
