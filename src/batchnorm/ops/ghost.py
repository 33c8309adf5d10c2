"""Ghost batch norm operators: ``torch.ops.batchnorm.{ghost_train, ghost_train_backward}``.

The batch (N, C, *) is split along N into ghost batches of ``v`` samples (the last one
smaller; a last one of a single value per channel is merged into the one before, see
:func:`ghost_split`). Per (ghost batch g, channel c) over its m_g values:

    x_hat = (x - mu_gc) / sqrt(var_gc + eps),   y = weight_c * x_hat + bias_c

``ghost_train`` returns y and the per-ghost-batch mean (K, C) float64 and biased variance
(K, C); :func:`pooled_moments` merges those into the whole batch's (Chan's merge), which is
what the running statistics record. Backward per (g, c), g = dL/dy:

    dx = weight_c * invstd_gc * (g - mean(g) - x_hat * mean(g * x_hat))
    dweight_c = sum_g sum g * x_hat,   dbias_c = sum_g sum g

Numerics: every step over the data is one torch op on a strided view (K, v, C, S) of x (or
(K, v, S, C) for channels_last), no transposing copy and no loop over ghost batches; runs of
about BLOCK_BYTES keep the passes in cache. Values are centred on a per-(g, c) shift (the
float32 rounding of the mean in the backward, the mean of a few samples in the forward), so
``x - shift`` is exact for data far from zero (mean 1e4, std 1e-2) and the one-pass variance
of the small residual keeps its digits.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .._kernels import torch_ops
from .._kernels.dispatch import _numba, get_backend
from ._common import acc_dtype, fold_channels, fold_vector, fresh, to_front, unfold_channels
from ._path import apply, eager, eager_backward, forward_ad_active, needs_grad
from .bn import memory_format_of

__all__ = ["ghost_split", "ghost_train", "ghost_train_backward", "ghost_pool", "ghost_forward", "pooled_moments"]

BLOCK_BYTES = 512 << 10
"""Ghost batches are processed in runs of about this many bytes (at least one ghost batch),
so that the several passes over a run stay in cache (L2 is 2 MiB on the machines measured)."""

SHIFT_SAMPLES = 4
"""Samples per ghost batch averaged into the forward's shift."""


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


def _channels_last(x: Tensor) -> bool:
    return x.dim() > 2 and memory_format_of(x) != torch.contiguous_format


def _view(x: Tensor, k: int) -> tuple[Tensor, tuple[int, ...], tuple[int, ...]]:
    """x (k*n, C, *) as (k, n, C, S) reduced over (1, 3), or (k, n, S, C) over (1, 2) when
    channels_last (no copy); returns (view, reduce dims, per-channel broadcast shape)."""
    c = x.shape[1]
    s = x[0, 0].numel()
    if _channels_last(x):
        return x.movedim(1, -1).reshape(k, -1, s, c), (1, 2), (1, 1, 1, c)
    return x.contiguous().reshape(k, -1, c, s), (1, 3), (1, 1, c, 1)


def _unview(y: Tensor, like: Tensor) -> Tensor:
    """Inverse of :func:`_view`: the shape and memory format of ``like``."""
    if _channels_last(like):
        return y.reshape(like.shape[0], *like.shape[2:], like.shape[1]).movedim(-1, 1)
    return y.reshape(like.shape)


def _scratch(like: Tensor, dtype: torch.dtype) -> Tensor:
    """An uninitialized tensor of ``like``'s shape; large CPU ones from the kernels' output pool
    (a fresh multi-MB tensor costs page faults on first touch, measured 3-5x the pass that fills it)."""
    from .._kernels import outpool

    big = like.numel() * 8 >= outpool.MIN_BYTES
    if big and like.device.type == "cpu" and like.is_contiguous() and get_backend() != "torch" and _numba() is not None:
        out = outpool.empty_like(like, dtype)
        if out is not None:
            return out
    return torch.empty(like.shape, dtype=dtype, device=like.device)


def _blocks(xv: Tensor, acc: torch.dtype) -> list[slice]:
    """Runs of ghost batches (dim 0 of ``xv``) of about BLOCK_BYTES each (one run off the CPU)."""
    k = xv.shape[0]
    if xv.device.type != "cpu":
        return [slice(0, k)]
    per_ghost = (xv.numel() // k) * torch.empty((), dtype=acc).element_size()
    step = max(1, BLOCK_BYTES // per_ghost)
    return [slice(i, min(i + step, k)) for i in range(0, k, step)]


def _forward_part(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, k: int
) -> tuple[Tensor, Tensor, Tensor]:
    """(y, mean (k, C) float64, var (k, C) acc) of x (k*n, C, *) in k ghost batches."""
    acc = acc_dtype(x.dtype)
    xv, dims, pc = _view(x, k)
    shift = xv[:, :SHIFT_SAMPLES].to(acc).mean(dim=dims, keepdim=True)  # (k, 1, C, 1) / (k, 1, 1, C)
    w = weight.to(acc).reshape(pc) if weight is not None else None
    b = bias.to(acc).reshape(pc) if bias is not None else None
    yv = _scratch(xv, acc)  # y; each run's d^2 first
    blocks = _blocks(xv, acc)
    d_buf = torch.empty((blocks[0].stop, *xv.shape[1:]), dtype=acc, device=x.device)
    m = xv.numel() // shift.numel()
    means, variances = [], []
    for blk in blocks:
        d = torch.sub(xv[blk], shift[blk], out=d_buf[: blk.stop - blk.start])
        mean_d = d.sum(dim=dims, keepdim=True) / m
        sq = torch.mul(d, d, out=yv[blk])
        var = (sq.sum(dim=dims, keepdim=True) / m - mean_d * mean_d).clamp_min(0.0)
        scale = torch.rsqrt(var + eps)
        if w is not None:
            scale = scale * w
        # y = (d - mean_d) * scale + bias = d * scale + offset: d is small, nothing cancels
        offset = -mean_d * scale if b is None else torch.addcmul(b, mean_d, scale, value=-1.0)
        torch.addcmul(offset, d, scale, out=yv[blk])
        means.append(mean_d)
        variances.append(var)
    mean_d = torch.cat(means) if len(means) > 1 else means[0]
    var = torch.cat(variances) if len(variances) > 1 else variances[0]
    y = _unview(yv.to(x.dtype), x)
    mean = (shift.double() + mean_d.double()).reshape(k, -1)
    return y, mean, var.reshape(k, -1)


def _backward_part(
    grad_y: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor, var: Tensor, eps: float, k: int
) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, sum g * x_hat (C,), sum g (C,)) of one part, from its (k, C) statistics.

    Centring: shift = mean rounded to acc, mean_d = mean - shift (small, exact in float64), so
    x - mu = (x - shift) - mean_d keeps the digits of data far from zero.
    """
    acc = acc_dtype(x.dtype)
    xv, dims, pc = _view(x, k)
    gv = _view(grad_y.contiguous(memory_format=memory_format_of(x)), k)[0]
    stat_shape = (k, *pc[1:])
    shift = mean.to(acc).reshape(stat_shape)
    mean_d = (mean - shift.double().reshape(k, -1)).to(acc).reshape(stat_shape)
    invstd = torch.rsqrt(var.to(acc) + eps).reshape(stat_shape)
    w = weight.to(acc).reshape(pc) if weight is not None else None
    m = xv.numel() // invstd.numel()
    blocks = _blocks(xv, acc)
    dxv = _scratch(xv, acc)
    d_buf = torch.empty((blocks[0].stop, *xv.shape[1:]), dtype=acc, device=x.device)
    sums_g, sums_gxhat = [], []
    for blk in blocks:
        g_b, mean_b, inv_b = gv[blk].to(acc), mean_d[blk], invstd[blk]
        d = torch.sub(xv[blk], shift[blk], out=d_buf[: blk.stop - blk.start])
        prod = torch.mul(g_b, d, out=dxv[blk])
        sum_g = g_b.sum(dim=dims, keepdim=True)
        sum_gc = prod.sum(dim=dims, keepdim=True) - mean_b * sum_g  # sum g * (x - mu)
        scale = inv_b if w is None else inv_b * w
        coef = -(scale * inv_b * inv_b * sum_gc) / m
        const = -(scale * sum_g) / m - coef * mean_b
        torch.addcmul(const, g_b, scale, out=prod).addcmul_(d, coef)  # dx into dxv[blk]
        sums_g.append(sum_g)
        sums_gxhat.append(sum_gc * inv_b)
    dx = _unview(dxv.to(x.dtype), x)
    sum_g = torch.cat(sums_g) if len(sums_g) > 1 else sums_g[0]
    sum_gxhat = torch.cat(sums_gxhat) if len(sums_gxhat) > 1 else sums_gxhat[0]
    return dx, sum_gxhat.sum(0).reshape(-1), sum_g.sum(0).reshape(-1)


def _cat_like(pieces: list[Tensor], like: Tensor) -> Tensor:
    y = torch.cat(pieces) if len(pieces) > 1 else pieces[0]
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
    return fresh((_cat_like(ys, x), torch.cat(means).reshape(-1), torch.cat(variances).reshape(-1)), (x, weight, bias))


ghost_train = torch.library.custom_op("batchnorm::ghost_train", _ghost_train_impl, mutates_args=())


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
    """Backward of :func:`ghost_train`: (dx, dweight, dbias), the sums in float32 (float64 for float64)."""
    dxs, dw, db = [], None, None
    row = 0
    mean, var = mean.reshape(-1, x.shape[1]), var.reshape(-1, x.shape[1])
    grads = grad_y.split([p.shape[0] for p, _ in _parts(x, virtual_batch_size)])
    for (part, k), g in zip(_parts(x, virtual_batch_size), grads):
        dx, sw, sb = _backward_part(g, part, weight, mean[row : row + k], var[row : row + k], eps, k)
        row += k
        dxs.append(dx)
        dw = sw if dw is None else dw + sw
        db = sb if db is None else db + sb
    return fresh((_cat_like(dxs, x), dw, db), (grad_y, x, weight, mean, var))  # type: ignore[arg-type]


ghost_train_backward = torch.library.custom_op(
    "batchnorm::ghost_train_backward", _ghost_train_backward_impl, mutates_args=()
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
    """(K*B*C,) -> (B, K*C), the inverse of :func:`_fold_rows`."""
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
    acc = acc_dtype(x.dtype)
    dxs, sw, sb = [], None, None
    grads = grad_y.split([p.shape[0] for p, _ in _parts(x, v)])
    for (part, k), g in zip(_parts(x, v), grads):
        xv, dims, pc = _view(part, k)
        gv = _view(g.contiguous(memory_format=memory_format_of(part)), k)[0].to(acc)
        xa = xv.to(acc)
        mu = xa.mean(dim=dims, keepdim=True)
        xc = xa - mu
        invstd = torch.rsqrt((xc * xc).mean(dim=dims, keepdim=True) + eps)
        x_hat = xc * invstd
        mean_g = gv.mean(dim=dims, keepdim=True)
        mean_gx = (gv * x_hat).mean(dim=dims, keepdim=True)
        scale = invstd if weight is None else invstd * weight.to(acc).reshape(pc)
        dxs.append(_unview((scale * (gv - mean_g - x_hat * mean_gx)).to(x.dtype), part))
        pw = (gv * x_hat).sum(dim=dims).sum(0).reshape(-1)
        pb = gv.sum(dim=dims).sum(0).reshape(-1)
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
    """:class:`_GhostTrain` on the eager path (one more argument marks it): the implementations
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
    acc = acc_dtype(x.dtype)
    pieces, row = [], 0
    mean, var = mean.reshape(-1, x.shape[1]), var.reshape(-1, x.shape[1])
    for part, k in _parts(x, v):
        xv, _, pc = _view(part, k)
        shape = (k, *pc[1:])
        mu = mean[row : row + k].reshape(shape)
        inv = torch.rsqrt(var[row : row + k].to(acc) + eps).reshape(shape)
        pieces.append(_unview(((xv.double() - mu) * inv).to(acc), part))
        row += k
    return torch.cat(pieces) if len(pieces) > 1 else pieces[0]


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
    w = torch.tensor(counts, dtype=torch.float64, device=mean.device).reshape(-1, 1)  # (K, 1)
    total = max(float(sum(counts)), 1.0)
    mean, var = mean.double().reshape(-1, x.shape[1]), var.reshape(-1, x.shape[1])
    mu = (w * mean).sum(0) / total
    m2 = (w * (var.double() + (mean - mu).square())).sum(0)
    return mu, m2 / total


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
    """:func:`ghost_pool` on detached statistics (not differentiable)."""
    x, mean, var = x.detach(), mean.detach(), var.detach()
    return (_ghost_pool_impl if eager(x, mean, var) else ghost_pool)(x, mean, var, virtual_batch_size)
