"""Ghost batch norm operators: ``torch.ops.batchnorm.{ghost_train, ghost_train_backward}``.

The batch (N, C, *) is split along N into ghost batches of ``v`` samples (the last one
smaller; a last one of a single value per channel is merged into the one before, see
`ghost_split`). Per (ghost batch g, channel c) over its m_g values:

    x_hat = (x - mu_gc) / sqrt(var_gc + eps),   y = weight_c * x_hat + bias_c

``ghost_train`` returns y and the per-ghost-batch mean (K, C) float64 and biased variance
(K, C); `pooled_moments` merges those into the whole batch's (Chan's merge), which is
what the running statistics record. Backward per (g, c), g = dL/dy:

    dx = weight_c * invstd_gc * (g - mean(g) - x_hat * mean(g * x_hat))
    dweight_c = sum_g sum g * x_hat,   dbias_c = sum_g sum g

Numerics: the k equal ghost batches of a part of x (k*n, C, *) are k*C channels of one batch:
`fold` makes the (n, k*C, *) tensor (a copy), and the kernel back-end of the folded tensor
(`batchnorm._kernels.dispatch.backend_for`) computes forward and backward exactly as for
plain batch norm, with weight and bias repeated k times and the parameter gradients summed
over the k copies. So ghost batch norm has the precision, the speed and the devices of the
kernels (``use_backend`` selects them too), and no numerics of its own.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .._kernels import torch_ops
from .._kernels.dispatch import backend_for
from ._common import acc_dtype, fold_channels, fold_vector, fresh, to_front, unfold_channels
from ._path import apply, eager, eager_backward, forward_ad_active, needs_grad
from .bn import memory_format_of
from .update import update_eager, update_running_stats_

_c = torch._C

__all__ = ["ghost_split", "ghost_train", "ghost_train_backward", "ghost_pool", "ghost_forward", "pooled_moments"]


def ghost_split(n: int, per_sample: int, v: int) -> tuple[int, int]:
    """(G, T): G full ghost batches of ``v`` samples, then one tail ghost batch of T samples.

    T = n - G*v < v normally; a tail with a single value per channel (one sample, no spatial
    extent) is merged into the last full ghost batch instead (then T = v + 1).
    """
    g, t = divmod(n, v)
    if g >= 1 and t * per_sample == 1:
        g, t = g - 1, t + v
    return g, t


def _parts(x: Tensor, v: int) -> list[tuple[Tensor, int]]:
    """[(part of x, number of ghost batches in it)]: the full ghost batches, then the tail."""
    g, t = ghost_split(x.shape[0], x[0, 0].numel(), v)
    parts: list[tuple[Tensor, int]] = []
    if g > 0 and t > 0:
        full, tail = x.split([g * v, t])
        parts = [(full, g), (tail, 1)]
    elif g > 0:
        parts = [(x, g)]
    else:
        parts = [(x, 1)]
    return parts


def fold(x: Tensor, k: int) -> Tensor:
    """x (k*n, C, *) -> (n, k*C, *): k ghost batches of n samples as k*C channels of one batch
    (channel g*C + c is channel c of ghost batch g). A copy, contiguous."""
    n = x.shape[0] // k
    return x.reshape(k, n, *x.shape[1:]).movedim(0, 1).reshape(n, k * x.shape[1], *x.shape[2:])


def unfold(y: Tensor, k: int, like: Tensor) -> Tensor:
    """The inverse of `fold`: (n, k*C, *) -> ``like``'s shape (k*n, C, *)."""
    n, c = y.shape[0], like.shape[1]
    return y.reshape(n, k, c, *like.shape[2:]).movedim(1, 0).reshape(like.shape)


def _forward_part(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, k: int
) -> tuple[Tensor, Tensor, Tensor]:
    """(y, mean (k, C) float64, var (k, C) acc) of x (k*n, C, *) in k ghost batches."""
    xf = fold(x, k)
    w = None if weight is None else weight.repeat(k)
    b = None if bias is None else bias.repeat(k)
    y, mean, var = backend_for(xf).train_forward(xf, w, b, eps)
    return unfold(y, k, x), mean.to(torch.float64).reshape(k, -1), var.reshape(k, -1)


def _backward_part(
    grad_y: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor, var: Tensor, eps: float, k: int
) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, sum g * x_hat (C,), sum g (C,)) of one part, from its (k, C) statistics."""
    xf = fold(x, k)
    invstd = torch.rsqrt(var.reshape(-1) + eps)
    w = None if weight is None else weight.repeat(k)
    dxf, dw, db = backend_for(xf).backward(fold(grad_y, k), xf, mean.reshape(-1), invstd, w)
    return unfold(dxf, k, x), dw.reshape(k, -1).sum(0), db.reshape(k, -1).sum(0)


def _cat_like(pieces: list[Tensor], like: Tensor) -> Tensor:
    """The parts' outputs as one tensor in ``like``'s memory format."""
    y = torch.cat(pieces) if len(pieces) > 1 else pieces[0]
    if like.is_contiguous():
        return y
    fmt = memory_format_of(like)
    return y.contiguous(memory_format=fmt) if fmt != torch.contiguous_format else y


def _ghost_train_impl(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, virtual_batch_size: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Ghost-batch training forward: (y, mean (K*C,) float64, biased var (K*C,)) of the K ghost batches, ghost-batch-major."""
    if x.numel() == 0:
        k, c = _ghost_count(x, virtual_batch_size), x.shape[1]
        return (
            torch.empty_like(x),
            x.new_zeros(k * c, dtype=torch.float64),
            x.new_zeros(k * c, dtype=acc_dtype(x.dtype)),
        )
    ys, means, variances = [], [], []
    for part, k in _parts(x, virtual_batch_size):
        y, mean, var = _forward_part(part, weight, bias, eps, k)
        ys.append(y)
        means.append(mean)
        variances.append(var)
    # statistics flat (K*C,), ghost-batch-major: a 1-D shape keeps a dynamic batch free of size-1 guards
    return _cat_like(ys, x), torch.cat(means).reshape(-1), torch.cat(variances).reshape(-1)


def _ghost_train_op(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, virtual_batch_size: int
) -> tuple[Tensor, Tensor, Tensor]:
    """`_ghost_train_impl` as an operator implementation: no output aliases an input."""
    return fresh(_ghost_train_impl(x, weight, bias, eps, virtual_batch_size), (x, weight, bias))


ghost_train = torch.library.custom_op("batchnorm::ghost_train", _ghost_train_op, mutates_args=())


def _ghost_count(x: Tensor, v: int) -> int:
    """K, the number of ghost batches of x (N, C, *): ceil(N / v), one fewer when a tail of a
    single value per channel merges into the batch before it (S = 1 and N mod v = 1). Written
    as one floor division, so that it holds for a symbolic N (torch.export's dynamic batch)."""
    s = 1
    for d in x.shape[2:]:
        s = s * d
    return (x.shape[0] + v - (2 if s == 1 else 1)) // v


@ghost_train.register_fake
def _ghost_train_fake(x, weight, bias, eps, virtual_batch_size):
    k = _ghost_count(x, virtual_batch_size)
    c = x.shape[1]
    y = torch.empty_like(x, memory_format=memory_format_of(x))
    return y, x.new_empty((k * c,), dtype=torch.float64), x.new_empty((k * c,), dtype=acc_dtype(x.dtype))


def _ghost_train_backward_impl(
    grad_y: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor, var: Tensor, eps: float, virtual_batch_size: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Backward of `ghost_train`: (dx, dweight, dbias), the sums in float32 (float64 for float64)."""
    dxs, dw, db = [], None, None
    row = 0
    mean, var = mean.reshape(-1, x.shape[1]), var.reshape(-1, x.shape[1])
    parts = _parts(x, virtual_batch_size)
    grads = grad_y.split([p.shape[0] for p, _ in parts]) if len(parts) > 1 else (grad_y,)
    for (part, k), g in zip(parts, grads):
        dx, sw, sb = _backward_part(g, part, weight, mean[row : row + k], var[row : row + k], eps, k)
        row += k
        dxs.append(dx)
        dw = sw if dw is None else dw + sw
        db = sb if db is None else db + sb
    return _cat_like(dxs, x), dw, db  # type: ignore[return-value]


def _ghost_train_backward_op(
    grad_y: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor, var: Tensor, eps: float, virtual_batch_size: int
) -> tuple[Tensor, Tensor, Tensor]:
    """`_ghost_train_backward_impl` as an operator implementation: no output aliases an input."""
    out = _ghost_train_backward_impl(grad_y, x, weight, mean, var, eps, virtual_batch_size)
    return fresh(out, (grad_y, x, weight, mean, var))


ghost_train_backward = torch.library.custom_op(
    "batchnorm::ghost_train_backward", _ghost_train_backward_op, mutates_args=()
)


@ghost_train_backward.register_fake
def _ghost_backward_fake(grad_y, x, weight, mean, var, eps, virtual_batch_size):
    acc = acc_dtype(x.dtype)
    c = x.shape[1]
    return (
        torch.empty_like(x, memory_format=memory_format_of(x)),
        x.new_empty((c,), dtype=acc),
        x.new_empty((c,), dtype=acc),
    )


def _fold_rows(t: Tensor | None, dim: int | None, b: int, c: int) -> Tensor | None:
    """Flat per-ghost-batch statistics of B problems, (B, K*C) -> (K*B*C,): K rows of B*C channels."""
    t = to_front(t, dim, b)
    return None if t is None else t.reshape(b, -1, c).movedim(0, 1).reshape(-1)


def _unfold_rows(t: Tensor, b: int, c: int) -> Tensor:
    """(K*B*C,) -> (B, K*C), the inverse of `_fold_rows`."""
    return t.reshape(-1, b, c).movedim(1, 0).reshape(b, -1)


def _ghost_train_vmap(info: Any, in_dims: tuple[Any, ...], x, weight, bias, eps, v):
    b = info.batch_size
    xd, wd, bd = in_dims[:3]
    y, mean, var = ghost_train(
        fold_channels(to_front(x, xd, b)),
        fold_vector(to_front(weight, wd, b)),
        fold_vector(to_front(bias, bd, b)),
        eps,
        v,
    )
    c = y.shape[1] // b
    return (unfold_channels(y, b), _unfold_rows(mean, b, c), _unfold_rows(var, b, c)), (0, 0, 0)


ghost_train.register_vmap(_ghost_train_vmap)


def _ghost_backward_vmap(info: Any, in_dims: tuple[Any, ...], grad_y, x, weight, mean, var, eps, v):
    b = info.batch_size
    gd, xd, wd, md, vd = in_dims[:5]
    dx, dw, db = ghost_train_backward(
        fold_channels(to_front(grad_y, gd, b)),
        fold_channels(to_front(x, xd, b)),
        fold_vector(to_front(weight, wd, b)),
        _fold_rows(mean, md, b, to_front(x, xd, b).shape[2]),
        _fold_rows(var, vd, b, to_front(x, xd, b).shape[2]),
        eps,
        v,
    )
    return (unfold_channels(dx, b), dw.reshape(b, -1), db.reshape(b, -1)), (0, 0, 0)


ghost_train_backward.register_vmap(_ghost_backward_vmap)


def _composite_backward(
    grad_y: Tensor, x: Tensor, weight: Tensor | None, eps: float, v: int
) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias) from differentiable torch ops (statistics recomputed from x), for
    ``create_graph=True``: autograd then sees how every ghost batch's mean and invstd depend on x."""
    dxs, sw, sb = [], None, None
    grads = grad_y.split([p.shape[0] for p, _ in _parts(x, v)])
    for (part, k), g in zip(_parts(x, v), grads):
        xf = fold(part, k)
        mean, var = torch_ops.batch_stats(xf)
        dxf, pw, pb = torch_ops.backward(
            fold(g, k), xf, mean, torch.rsqrt(var + eps), (None if weight is None else weight.repeat(k))
        )
        dxs.append(unfold(dxf, k, part))
        pw, pb = pw.reshape(k, -1).sum(0), pb.reshape(k, -1).sum(0)
        sw = pw if sw is None else sw + pw
        sb = pb if sb is None else sb + pb
    return _cat_like(dxs, x), sw, sb  # type: ignore[return-value]


def _setup(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor, Tensor]) -> None:
    x, weight, bias, eps, v = inputs[:5]
    ctx.eager = False  # the eager path's backward decides (eager_backward)
    ctx.save_for_backward(x, weight, output[1], output[2])
    ctx.eps, ctx.v = eps, v
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.mark_non_differentiable(output[1], output[2])


def _grads(ctx: Any, grad_y: Tensor, _gm: Any, _gv: Any):
    x, weight, mean, var = ctx.saved_tensors
    if grad_y is None:
        return None, None, None, None, None
    if torch.is_grad_enabled():
        dx, dw, db = _composite_backward(grad_y, x, weight, ctx.eps, ctx.v)
    else:
        backward = _ghost_train_backward_impl if ctx.eager else ghost_train_backward
        dx, dw, db = backward(grad_y, x, weight, mean, var, ctx.eps, ctx.v)
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    return (
        dx if need_x else None,
        dw.to(weight.dtype) if need_w and weight is not None else None,
        db.to(ctx.bias_dtype) if need_b and ctx.bias_dtype is not None else None,
        None,
        None,
    )


ghost_train.register_autograd(_grads, setup_context=_setup)


class _GhostTrain(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x, weight, bias, eps, v):  # type: ignore[override]
        return ghost_train(x, weight, bias, eps, v)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        _setup(ctx, inputs, output)

    @staticmethod
    def backward(ctx: Any, grad_y: Tensor, gm: Any, gv: Any):  # type: ignore[override]
        return _grads(ctx, grad_y, gm, gv)


class _GhostTrainEager(_GhostTrain):
    """`_GhostTrain` on the eager path (one more argument marks it): the implementations
    run directly, forward and backward."""

    @staticmethod
    def forward(x, weight, bias, eps, v, _eager):  # type: ignore[override]
        return _ghost_train_impl(x, weight, bias, eps, v)

    @staticmethod
    def backward(ctx: Any, grad_y: Tensor, gm: Any, gv: Any):  # type: ignore[override]
        ctx.eager = eager_backward(grad_y)
        return (*_grads(ctx, grad_y, gm, gv), None)


class _GhostTrainForwardAD(_GhostTrain):
    """With a forward-mode rule: per ghost batch, dy = weight * J_g(dx) + dweight * x_hat + dbias."""

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        _setup(ctx, inputs, output)
        ctx.save_for_forward(inputs[0], inputs[1], output[1], output[2])

    @staticmethod
    def jvp(ctx: Any, tx, tw, tb, _te, _tv):  # type: ignore[override]
        x, weight, mean, var = ctx.saved_tensors
        acc = acc_dtype(x.dtype)
        nd = x.dim()
        ty = None
        if tx is not None:  # the backward map with weight 1 is the Jacobian of x -> x_hat (symmetric)
            ty, _, _ = ghost_train_backward(tx, x, None, mean, var, ctx.eps, ctx.v)
            if weight is not None:
                ty = ty * torch_ops.channel_view(weight, nd)
        if tw is not None or tb is not None:
            extra = torch.zeros((), dtype=acc, device=x.device)
            if tw is not None:
                x_hat = _ghost_normalized(x, mean, var, ctx.eps, ctx.v)
                extra = extra + x_hat * torch_ops.channel_view(tw.to(acc), nd)
            if tb is not None:
                extra = extra + torch_ops.channel_view(tb.to(acc), nd)
            ty = extra.to(x.dtype) if ty is None else ty + extra.to(x.dtype)
        return ty, None, None


def _ghost_normalized(x: Tensor, mean: Tensor, var: Tensor, eps: float, v: int) -> Tensor:
    """x_hat (acc dtype, x's shape) from the per-ghost-batch statistics (K, C)."""
    pieces, row = [], 0
    mean, var = mean.reshape(-1, x.shape[1]), var.reshape(-1, x.shape[1])
    for part, k in _parts(x, v):
        xf = fold(part, k)
        invstd = torch.rsqrt(var[row : row + k].reshape(-1) + eps)
        x_hat = torch_ops.center(xf, mean[row : row + k].reshape(-1)) * torch_ops.channel_view(invstd, xf.dim())
        pieces.append(unfold(x_hat.to(invstd.dtype), k, part))
        row += k
    return torch.cat(pieces) if len(pieces) > 1 else pieces[0]


def ghost_step(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    num_batches_tracked: Tensor,
    num_batches_skipped: Tensor,
    momentum: float | None,
    eps: float,
    virtual_batch_size: int,
    where: str,
) -> Tensor:
    """A ghost-batch training step on checked arguments: y and, when ``running_mean`` and
    ``running_var`` are given, ONE update of them with the whole batch's statistics (pooled from
    the ghost batches, `ghost_pool`). The path is decided once for all of it."""
    v = virtual_batch_size
    count = x.numel() // x.shape[1] if x.shape[1] else 0
    if eager(x, weight, bias):
        if _c.is_grad_enabled() and (x.requires_grad or (weight is not None and weight.requires_grad) or (bias is not None and bias.requires_grad)):  # fmt: skip
            y, mean_k, var_k = apply(_GhostTrainEager, x, weight, bias, eps, v, True)
        else:
            y, mean_k, var_k = _ghost_train_impl(x, weight, bias, eps, v)
        if running_mean is not None and running_var is not None and count:
            mean, var = _ghost_pool_impl(x, mean_k, var_k, v)
            update_eager(running_mean, running_var, num_batches_tracked, num_batches_skipped, mean, var, count, momentum, where)  # fmt: skip
        return y
    y, mean_k, var_k = ghost_forward(x, weight, bias, eps, v)
    if running_mean is not None and running_var is not None and count:
        mean, var = pooled_moments(x, mean_k, var_k, v)
        update_running_stats_(running_mean, running_var, num_batches_tracked, num_batches_skipped, mean, var, count, momentum, where)  # fmt: skip
    return y


def ghost_forward(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, virtual_batch_size: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Differentiable ghost-batch training forward: (y, mean (K*C,) float64, var (K*C,)), ghost-batch-major."""
    if eager(x, weight, bias):
        if needs_grad(x, weight, bias):
            return apply(_GhostTrainEager, x, weight, bias, eps, virtual_batch_size, True)
        return _ghost_train_impl(x, weight, bias, eps, virtual_batch_size)
    fn = _GhostTrainForwardAD if forward_ad_active() else _GhostTrain
    return fn.apply(x, weight, bias, eps, virtual_batch_size)


def _ghost_pool_impl(x: Tensor, mean: Tensor, var: Tensor, virtual_batch_size: int) -> tuple[Tensor, Tensor]:
    """The whole batch's (mean float64 (C,), biased var float64 (C,)) from the ghost batches'
    (K, C) statistics of x, by Chan's merge with each ghost batch's count m_g:

        M = sum_g m_g,   mu = sum_g m_g mu_g / M,   var = sum_g m_g (var_g + (mu_g - mu)^2) / M

    exactly the statistics plain batch norm would record for the batch (the spread between
    ghost means is part of the population variance). Only x's shape is read."""
    s = x[0, 0].numel() if x.numel() else 0
    counts: list[int] = []
    if x.numel():
        for part, k in _parts(x, virtual_batch_size):
            counts += [part.shape[0] * s // k] * k
    n = torch.tensor(counts, dtype=torch.float64, device=mean.device)  # (K,)
    mean, var = mean.double().reshape(-1, x.shape[1]), var.double().reshape(-1, x.shape[1])
    total, mu, m2 = torch_ops.merge_moments(n, mean, var * n.unsqueeze(-1))
    return mu, m2 / total.clamp_min(1.0)


ghost_pool = torch.library.custom_op("batchnorm::ghost_pool", _ghost_pool_impl, mutates_args=())


@ghost_pool.register_fake
def _ghost_pool_fake(x, mean, var, virtual_batch_size):
    c = x.shape[1]
    return x.new_empty((c,), dtype=torch.float64), x.new_empty((c,), dtype=torch.float64)


def _ghost_pool_vmap(info: Any, in_dims: tuple[Any, ...], x, mean, var, v):
    b = info.batch_size
    xd, md, vd = in_dims[:3]
    c = to_front(x, xd, b).shape[2]
    mu, var_p = ghost_pool(fold_channels(to_front(x, xd, b)), _fold_rows(mean, md, b, c), _fold_rows(var, vd, b, c), v)
    return (mu.reshape(b, -1), var_p.reshape(b, -1)), (0, 0)


ghost_pool.register_vmap(_ghost_pool_vmap)


def pooled_moments(x: Tensor, mean: Tensor, var: Tensor, virtual_batch_size: int) -> tuple[Tensor, Tensor]:
    """`ghost_pool` on detached statistics (not differentiable)."""
    x, mean, var = x.detach(), mean.detach(), var.detach()
    return (_ghost_pool_impl if eager(x, mean, var) else ghost_pool)(x, mean, var, virtual_batch_size)
