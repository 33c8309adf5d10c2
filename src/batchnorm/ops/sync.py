"""Synchronized batch norm: statistics over every process of a group, on the device.

Operators (opaque, shape-known nodes for torch.compile and torch.export):

- ``batchnorm::moments(x)`` (`batchnorm.ops.bn`): the local (mean, biased var);
- ``batchnorm::sync_normalize``: the normalize pass with the global statistics (``batchnorm::eval``),
  whose registered backward is ``batchnorm::sync_backward``: the local sums
  (``batchnorm::backward_sums``), ONE all-reduce inside the operator, then dx
  (``batchnorm::backward_apply``). Being the operator's own autograd, it holds in eager mode,
  under torch.compile and in an exported program alike.

Between them, one collective per pass, the operator ``batchnorm::all_reduce_sum`` (no host read):

    forward:   each rank's row (m_r, mean_r, M2_r) gathered by one SUM all-reduce of a (W, 1 + 2C)
               float64 buffer, then Chan's merge on the device:
               M = sum m_r,  mu = sum m_r mu_r / M,  M2 = sum M2_r + sum m_r (mu_r - mu)^2
    backward:  one SUM all-reduce of the 2C local sums (sum g, sum g * x_hat)

    dx = weight / sqrt(var + eps) * (g - (1/M) sum g - x_hat (1/M) sum g * x_hat)

``weight``/``bias`` get their local gradients (DistributedDataParallel reduces them like every
other parameter). The global count M stays a tensor: nothing is read back to the host, so ranks
with no samples and uneven batches are handled by counts, not by a host-side mask.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .._kernels import torch_ops
from .._kernels.dispatch import backend_for
from ..distributed import collectives as _collectives
from ._common import acc_dtype, fresh, register_channel_vmap
from .bn import moments
from .masked import masked_moments

__all__ = ["backward_sums", "backward_apply", "global_moments", "sync_normalize"]


@torch.library.custom_op("batchnorm::backward_sums", mutates_args=())
def backward_sums(grad_y: Tensor, x: Tensor, mean: Tensor) -> tuple[Tensor, Tensor]:
    """(sum g, sum g * (x - mean)) per channel, float64 (C,), around the given float64 ``mean``."""
    if x.numel() == 0:
        z = x.new_zeros(x.shape[1], dtype=torch.float64)
        return z, z.clone()
    sum_g, sum_gx = backend_for(x).backward_sums(grad_y, x, mean)
    return fresh((sum_g.to(torch.float64), sum_gx.to(torch.float64)), (grad_y, x, mean))


@backward_sums.register_fake
def _sums_fake(grad_y: Tensor, x: Tensor, mean: Tensor) -> tuple[Tensor, Tensor]:
    c = x.shape[1]
    return x.new_empty((c,), dtype=torch.float64), x.new_empty((c,), dtype=torch.float64)


register_channel_vmap(backward_sums, "xxc", "cc")


@torch.library.custom_op("batchnorm::backward_apply", mutates_args=())
def backward_apply(
    grad_y: Tensor,
    x: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Tensor | None,
    mean_g: Tensor,
    mean_gxhat: Tensor,
) -> Tensor:
    """dx = weight * invstd * (g - mean_g - (x - mean) * invstd * mean_gxhat), x's dtype."""
    if x.numel() == 0:
        return torch.empty_like(x)
    dx = backend_for(x).backward_apply(grad_y, x, mean, invstd, weight, mean_g, mean_gxhat)
    return fresh((dx,), (grad_y, x, mean, invstd, weight, mean_g, mean_gxhat))[0]


@backward_apply.register_fake
def _apply_fake(grad_y, x, mean, invstd, weight, mean_g, mean_gxhat):
    from .bn import memory_format_of

    return torch.empty_like(x, memory_format=memory_format_of(x))


register_channel_vmap(backward_apply, "xxccccc", "x")


def global_moments(
    x: Tensor, group: object | None, where: str, mask: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """(M, mean, var_biased) of the concatenation of every rank's ``x`` (N_r, C, *), all float64
    tensors on x's device (M a 0-dim count): one all-reduce, Chan's merge (module docstring).
    For M = 0 the mean and variance are 0. With ``mask`` (N_r, *) bool: over the real (True)
    positions only (`batchnorm.ops.masked.masked_moments`), M their global count."""
    c = x.shape[1]
    if mask is None:
        mean, var = moments(x)
        count = mean.new_full((1,), float(x.numel() // c if c else 0))
    else:
        n, mean_a, var = masked_moments(x.detach(), mask)
        mean, count = mean_a.to(torch.float64), n.to(torch.float64).reshape(1)
    m2 = var.to(torch.float64) * count
    size = _collectives.group_size(group, where)
    rank = _collectives.group_rank(group, where)
    row = torch.cat([count, mean, m2])  # (1 + 2C,)
    buf = torch.nn.functional.pad(row.unsqueeze(0), (0, 0, rank, size - rank - 1))  # (W, 1 + 2C)
    rows = _collectives.all_reduce_sum_functional(buf, group, where, "the per-rank batch statistics (count, mean, M2)")
    total, mean_g, m2_g = torch_ops.merge_moments(rows[:, 0], rows[:, 1 : 1 + c], rows[:, 1 + c :])
    var_g = (m2_g / total.clamp_min(1.0)).clamp_min(0.0)
    return total, mean_g, var_g


def _group_of(name: str) -> object:
    from torch.distributed.distributed_c10d import _resolve_process_group

    return _resolve_process_group(name)


@torch.library.custom_op("batchnorm::sync_normalize", mutates_args=())
def sync_normalize_op(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    mean: Tensor,
    var: Tensor,
    total: Tensor,
    eps: float,
    group_name: str,
    where: str,
) -> Tensor:
    """y = weight * (x - mean) / sqrt(var + eps) + bias with the group's statistics; its autograd
    (``batchnorm::sync_backward``) is the global batch's backward, one all-reduce."""
    from .bn import eval_bn

    return eval_bn(x, mean, var, weight, bias, eps)


@sync_normalize_op.register_fake
def _sync_normalize_fake(x, weight, bias, mean, var, total, eps, group_name, where):
    from .bn import memory_format_of

    return torch.empty_like(x, memory_format=memory_format_of(x))


@torch.library.custom_op("batchnorm::sync_backward", mutates_args=())
def sync_backward(
    grad_y: Tensor,
    x: Tensor,
    weight: Tensor | None,
    mean: Tensor,
    var: Tensor,
    total: Tensor,
    eps: float,
    group_name: str,
    where: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias): the local sums, ONE all-reduce of them over the group, then dx with the
    global means. dweight and dbias are the local sums (DDP reduces them like any parameter)."""
    invstd = torch.rsqrt(var + eps)
    sum_g, sum_gx = backward_sums(grad_y, x, mean)
    c = sum_g.numel()
    packed = torch.cat([sum_g, sum_gx])
    _collectives.all_reduce_sum(packed, _group_of(group_name), where, "the gradient sums (sum g, sum g*x_hat)")
    m = total.clamp_min(1.0)
    dx = backward_apply(grad_y, x, mean, invstd, weight, packed[:c] / m, packed[c:] * invstd / m)
    return dx, (sum_gx * invstd).to(acc_dtype(x.dtype)), sum_g.to(acc_dtype(x.dtype))


@sync_backward.register_fake
def _sync_backward_fake(grad_y, x, weight, mean, var, total, eps, group_name, where):
    from .bn import memory_format_of

    acc = acc_dtype(x.dtype)
    c = x.shape[1]
    return (
        torch.empty_like(x, memory_format=memory_format_of(x)),
        x.new_empty((c,), dtype=acc),
        x.new_empty((c,), dtype=acc),
    )


def _sync_setup(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    x, weight, bias, mean, var, total, eps, group_name, where = inputs
    ctx.save_for_backward(x, weight, mean, var, total)
    ctx.eps, ctx.group_name, ctx.where = eps, group_name, where
    ctx.bias_dtype = None if bias is None else bias.dtype


def _sync_grads(ctx: Any, grad_y: Tensor):
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    if torch.is_grad_enabled():  # create_graph=True: a backward autograd can differentiate
        dx, dw, db = _backward_graph(ctx, grad_y)
    else:
        x, weight, mean, var, total = ctx.saved_tensors
        dx, dw, db = sync_backward(grad_y, x, weight, mean, var, total, ctx.eps, ctx.group_name, ctx.where)
        dw = dw.to(weight.dtype) if weight is not None else None
        db = db.to(ctx.bias_dtype) if ctx.bias_dtype is not None else None
    return (
        dx if need_x else None,
        dw if need_w else None,
        db if need_b else None,
        None,
        None,
        None,
        None,
        None,
        None,
    )


sync_normalize_op.register_autograd(_sync_grads, setup_context=_sync_setup)


def _backward_graph(ctx: Any, grad_y: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """(dx, dweight, dbias) as differentiable float64 ops, for ``create_graph=True``.

    The statistics are recomputed from x around the float64 global mean s, with differentiable
    all-reduces (AR): S1 = AR(sum (x - s)), S2 = AR(sum (x - s)^2), mu - s = S1/M,
    var = S2/M - (S1/M)^2; then dx = weight invstd (g - AR(sum g)/M - x_hat AR(sum g x_hat)/M),
    so second derivatives see every rank's x. Every rank must differentiate alike.
    """
    x, weight, mean, _, total = ctx.saved_tensors
    nd = x.dim()
    dims = torch_ops.reduce_dims(x)
    c = mean.numel()
    m = total.clamp_min(1.0)

    def channel(t: Tensor) -> Tensor:
        return torch_ops.channel_view(t, nd)

    d = x.double() - channel(mean)
    local = torch.cat([d.sum(dim=dims), d.square().sum(dim=dims)])
    group = _group_of(ctx.group_name)
    sums = _collectives.all_reduce_sum_differentiable(local, group, ctx.where, "the batch sums")
    shift = sums[:c] / m
    invstd = torch.rsqrt((sums[c:] / m - shift.square()).clamp_min(0) + ctx.eps)
    x_hat = (d - channel(shift)) * channel(invstd)
    g = grad_y.double()
    local_g = torch.cat([g.sum(dim=dims), (g * x_hat).sum(dim=dims)])
    sums_g = _collectives.all_reduce_sum_differentiable(local_g, group, ctx.where, "the gradient sums")
    scale = invstd if weight is None else invstd * weight.double()
    dx = channel(scale) * (g - channel(sums_g[:c] / m) - x_hat * channel(sums_g[c:] / m))
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    dw = local_g[c:].to(weight.dtype) if (need_w and weight is not None) else None
    db = local_g[:c].to(ctx.bias_dtype) if (need_b and ctx.bias_dtype is not None) else None
    return (dx.to(x.dtype) if need_x else None), dw, db


def sync_normalize(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    mean: Tensor,
    var: Tensor,
    total: Tensor,
    eps: float,
    group: object | None,
    where: str,
) -> Tensor:
    """Differentiable normalize of the local x with the group's statistics (see the module docstring):
    ``batchnorm::sync_normalize``, whose backward is ``batchnorm::sync_backward``."""
    return sync_normalize_op(x, weight, bias, mean, var, total, eps, _collectives.group_name(group), where)
