"""``GhostBatchNorm1d/2d/3d``: batch norm over "ghost" (virtual) batches (Hoffer et al. 2017).

Training splits the batch along N into consecutive ghost batches of ``virtual_batch_size``
samples, B_1, ..., B_G, and normalizes each with its own statistics:

    for x in B_g:   y = weight * (x - mu_g) / sqrt(var_g + eps) + bias
    mu_g  = mean of B_g,   var_g = biased variance of B_g        (per channel, over N_g * spatial)

All full ghost batches are normalized by ONE autograd function (forward and hand-derived
backward) on a strided view (G, v, C, S) of x, with no Python loop over ghost batches and no
transposing copy: each step is one torch op over all of them, run over cache-sized runs of
ghost batches (see ``_GhostTrain``; ghost BN does not use the plain-BN kernels, whose layout
would need the transposition). When N is not a multiple of
``virtual_batch_size`` the last ghost batch is smaller and is a second call; if it would
hold a single value per channel (no variance: its output would be the constant ``bias`` and
carry no gradient) it is merged into the previous ghost batch instead; full ghost batches of
one value per channel (``virtual_batch_size=1`` on (N, C) input) raise ``ValueError``, as
``nn.BatchNorm`` does for a batch of one.

Running statistics: ONE update per training step, with the statistics of the *whole* batch,

    running_mean = (1 - momentum) * running_mean + momentum * mean(x)
    running_var  = (1 - momentum) * running_var  + momentum * unbiased_var(x)

where the whole-batch variance is pooled from the ghost batches (Chan's merge: sum of the
ghost M2 plus the spread of the ghost means), so it is exactly what ``nn.BatchNorm`` would
record for this batch. Why: inference normalizes with population statistics, and the whole
batch is the best estimate of them available; the spread *between* ghost means is part of the
population variance. The alternative of tf_keras (mean of the ghost variances, "not strictly
correct" in its own comment) leaves that spread out and depends on ``virtual_batch_size``; ours
does not, and PyTorch's loop-over-chunks recipes (pytorch-tabnet) apply the EMA G times per
step instead of once.

Evaluation is plain batch norm with the running statistics (with ``track_running_stats=False``:
with the statistics of the whole evaluation batch, no ghost batches). Same buffers and
``state_dict`` keys as ``nn.BatchNorm*d``; momentum and running_var conventions as PyTorch.
"""

from __future__ import annotations

import torch
import torch.fx
from torch import Tensor

from .. import _checks
from .._kernels import torch_ops
from .._kernels.dispatch import _numba, get_backend
from ..functional import _format, update_running_stats, warn_if_skipped
from .batchnorm import BatchNormBase, batch_norm_layer, is_fx_proxy, momentum_now, record_update, record_update_traced

__all__ = [
    "ghost_batch_norm",
    "ghost_batch_norm_layer",
    "GhostBatchNormBase",
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "GhostBatchNorm3d",
]


def _check_virtual_batch_size(v: object, where: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{where}: expected virtual_batch_size to be a positive int, got {v!r}")
    return v


def _ghost_split(n: int, per_sample: int, v: int) -> tuple[int, int]:
    """(G, T): G full ghost batches of ``v`` samples, then one tail ghost batch of T samples.

    T = n - G*v < v normally; a tail with a single value per channel (one sample, no spatial
    extent) is merged into the last full ghost batch instead (then T = v + 1).
    """
    g, t = divmod(n, v)
    if g >= 1 and t * per_sample == 1:
        g, t = g - 1, t + v
    return g, t


def _ghost_view(x: Tensor, k: int) -> tuple[Tensor, tuple[int, ...], tuple[int, ...]]:
    """View x (k*n, C, *) as ghost batches without copying (a copy only for other strides).

    Returns (view, reduce dims, per-channel shape): (k, n, C, S) reduced over (1, 3) for
    contiguous x; (k, n, S, C) reduced over (1, 2) for channels_last(_3d) x (C innermost).
    Per-(ghost batch, channel) statistics then have shape (k, 1, C, 1) or (k, 1, 1, C), and a
    per-channel vector (C,) broadcasts as (1, 1, C, 1) or (1, 1, 1, C).
    """
    c = x.shape[1]
    s = x[0, 0].numel()  # S = prod(spatial)
    if x.dim() > 2 and _format(x) != torch.contiguous_format:
        nhwc = x.movedim(1, -1)  # (k*n, *spatial, C), contiguous: a view of channels_last x
        return nhwc.reshape(k, -1, s, c), (1, 2), (1, 1, 1, c)  # (k, n, S, C)
    return x.contiguous().reshape(k, -1, c, s), (1, 3), (1, 1, c, 1)  # (k, n, C, S)


def _ghost_unview(y: Tensor, like: Tensor) -> Tensor:
    """Inverse of :func:`_ghost_view`: y in view shape -> the shape and memory format of ``like``."""
    if like.dim() > 2 and _format(like) != torch.contiguous_format:
        nhwc_shape = (like.shape[0], *like.shape[2:], like.shape[1])
        return y.reshape(nhwc_shape).movedim(-1, 1)  # (k*n, C, *spatial), channels_last
    return y.reshape(like.shape)


def _scratch(like: Tensor, dtype: torch.dtype) -> Tensor:
    """An uninitialized tensor of ``like``'s shape in ``dtype``.

    On CPU, large ones come from the kernels' output pool (:mod:`batchnorm._kernels.outpool`)
    when the numba back-end is installed and not switched off (``BATCHNORM_BACKEND=torch``):
    a fresh multi-MB tensor costs page faults on first touch, measured at 3-5x the time of
    the elementwise pass that fills it.
    """
    from .._kernels import outpool  # no import-time side effects (numpy buffers on demand)

    big = like.numel() * 8 >= outpool.MIN_BYTES  # cheap pre-check, at most 8 bytes per element
    pooled = big and like.device.type == "cpu" and like.is_contiguous() and get_backend() != "torch"
    if pooled and _numba() is not None:
        out = outpool.empty_like(like, dtype)
        if out is not None:
            return out
    return torch.empty(like.shape, dtype=dtype, device=like.device)


BLOCK_BYTES = 512 << 10
"""Ghost batches are processed in runs of about this many bytes (at least one ghost batch),
so that the several passes over a run find it in cache (L2 is 2 MiB on the machines measured)."""


def _blocks(xv: Tensor, acc: torch.dtype) -> list[slice]:
    """Slices of dim 0 (ghost batches) of view ``xv``, each of about BLOCK_BYTES in ``acc``
    (one slice off the CPU: there each op is a kernel launch, and no cache to fit)."""
    k = xv.shape[0]
    if xv.device.type != "cpu":
        return [slice(0, k)]
    per_ghost = (xv.numel() // k) * torch.empty((), dtype=acc).element_size()
    step = max(1, BLOCK_BYTES // per_ghost)
    return [slice(i, min(i + step, k)) for i in range(0, k, step)]


SHIFT_SAMPLES = 4
"""Samples per ghost batch averaged into the shift of :func:`_moments`."""


def _shift(xv: Tensor, dims: tuple[int, ...], acc: torch.dtype) -> Tensor:
    """Per (ghost batch, channel): the mean of the first SHIFT_SAMPLES samples, in ``acc``,
    shaped (k, 1, C, 1) or (k, 1, 1, C); a constant (no gradient). See :func:`_moments`."""
    head = xv.detach()[:, :SHIFT_SAMPLES]  # (k, s, C, S) or (k, s, S, C)
    return head.to(acc).mean(dim=dims, keepdim=True)


def _moments(
    xv: Tensor,
    shift: Tensor,
    dims: tuple[int, ...],
    acc: torch.dtype,
    d_buf: Tensor | None = None,
    sq_buf: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(d, mean_d, var) of the ghost-batch view ``xv``, statistics over ``dims``:

        d = x - shift,   mean_d = mean(d),   var = mean(d^2) - mean_d^2   (biased, clamped >= 0)
        mean(x) = shift + mean_d    (formed in float64 by the caller)

    Why this is exact enough: for mean 1e4 and std 1e-2 in float32 every x lies within a
    factor 2 of the shift, so ``x - shift`` is exact (Sterbenz) and d holds the spread, not the
    magnitude. The one-pass variance of d then loses only the factor 1 + (mean_d / std)^2 in
    relative precision, and a shift averaged from a few samples keeps mean_d small: ~1.25 on
    average for 4 samples; 26 if all 4 were 5-sigma outliers (var then good to ~3e-6 relative
    in float32; tested). The two-pass form costs two more passes over the data, and
    ``torch.var_mean`` over these middle dims measured 20x slower on CPU.

    Outside grad mode d and d^2 are written into ``d_buf``/``sq_buf`` (xv's shape, in acc)
    when given; under grad mode (double backward) everything is differentiable in ``xv``.
    """
    grad = torch.is_grad_enabled()
    if grad or d_buf is None:
        d = xv.to(acc) - shift  # (k, n, ...)
    else:
        d = torch.sub(xv, shift, out=d_buf)
    m = d.numel() // shift.numel()  # values per (ghost batch, channel)
    mean_d = d.sum(dim=dims, keepdim=True) / m
    squares = d * d if (grad or sq_buf is None) else torch.mul(d, d, out=sq_buf)
    var = (squares.sum(dim=dims, keepdim=True) / m - mean_d * mean_d).clamp_min(0.0)
    return d, mean_d, var


class _GhostTrain(torch.autograd.Function):
    """y, mean, var = ghost-batch BN of x (k*n, C, *) in k ghost batches of n samples each.

    Forward, per (ghost batch g, channel c) over its m = n * S values (DESIGN.md):
        x_hat = (x - mu_gc) / sqrt(var_gc + eps),   y = weight_c * x_hat + bias_c
    Backward (hand-derived, per (g, c), grad gy):
        dx = weight_c * invstd_gc * (gy - mean(gy) - x_hat * mean(gy * x_hat))
        dweight_c = sum_g sum gy * x_hat,   dbias_c = sum_g sum gy
    written with d = x - shift (:func:`_moments`), x - mu_gc = d - mean_d, so that each step
    over the data is one torch op on a strided view of x (no transposition, no loop over
    ghost batches): forward d, sum, d^2, sum, y = d * scale + offset; backward d, sum gy,
    gy * d, sum, dx = two addcmuls. The ghost batches are processed in runs of about
    BLOCK_BYTES, so that d and d^2 live in a cache-sized scratch and only y (dx) is written
    to memory. Statistics in ``acc_dtype`` (float32; float64 for float64 input). Saved for
    backward: x and per-(g, c) vectors, as plain BN. mean (float64) and var (acc) are returned
    with shape (k, C). The backward is itself differentiable (``create_graph=True``).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, k: int
    ) -> tuple[Tensor, Tensor, Tensor]:
        acc = torch_ops.acc_dtype(x.dtype)
        xv, dims, per_channel = _ghost_view(x, k)
        shift = _shift(xv, dims, acc)
        w = weight.to(acc).reshape(per_channel) if weight is not None else None
        b = bias.to(acc).reshape(per_channel) if bias is not None else None
        yv = _scratch(xv, acc)  # (k, n, ...): y; each run's d^2 first
        blocks = _blocks(xv, acc)
        d_buf = torch.empty((blocks[0].stop, *xv.shape[1:]), dtype=acc, device=x.device)  # one run
        stats: list[tuple[Tensor, Tensor, Tensor]] = []
        for blk in blocks:
            rows = blk.stop - blk.start
            d, mean_d, var = _moments(xv[blk], shift[blk], dims, acc, d_buf[:rows], yv[blk])
            invstd = torch.rsqrt(var + eps)  # (kb, 1, C, 1) or (kb, 1, 1, C)
            scale = invstd if w is None else invstd * w
            # y = (d - mean_d) * scale + bias = d * scale + offset: d is small, nothing cancels
            offset = -mean_d * scale if b is None else torch.addcmul(b, mean_d, scale, value=-1.0)
            torch.addcmul(offset, d, scale, out=yv[blk])
            stats.append((mean_d, var, invstd))
        mean_d, var, invstd = (torch.cat(t) for t in zip(*stats)) if len(stats) > 1 else stats[0]
        y = _ghost_unview(yv.to(x.dtype), x)
        ctx.save_for_backward(x, weight, shift, mean_d, invstd)
        ctx.meta = (eps, k, bias.dtype if bias is not None else None)
        mean = (shift.double() + mean_d.double()).reshape(k, -1)  # (k, C)
        var = var.reshape(k, -1)
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    def backward(ctx, grad_y: Tensor, _gmean: Tensor, _gvar: Tensor):  # type: ignore[override]
        x, weight, shift, mean_d, invstd = ctx.saved_tensors
        eps, k, bias_dtype = ctx.meta
        acc = invstd.dtype
        xv, dims, per_channel = _ghost_view(x, k)
        gv = _ghost_view(grad_y.contiguous(memory_format=_format(x)), k)[0].to(acc)  # laid out as xv
        w = weight.to(acc).reshape(per_channel) if weight is not None else None
        m = xv.numel() // invstd.numel()  # values per (ghost batch, channel)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad = torch.is_grad_enabled()
        if grad:
            # create_graph=True: one differentiable pass over everything; the statistics are
            # recomputed so that autograd sees how mean and invstd depend on x
            d, mean_d, var = _moments(xv, shift, dims, acc)
            invstd = torch.rsqrt(var + eps)
            blocks = [slice(0, xv.shape[0])]
            dxv = d_buf = None
        else:
            blocks = _blocks(xv, acc)
            dxv = _scratch(gv, acc)  # (k, n, ...): dx; each run's gy * d first
            d_buf = torch.empty((blocks[0].stop, *xv.shape[1:]), dtype=acc, device=x.device)
        sums: list[tuple[Tensor, Tensor]] = []
        pieces: list[Tensor] = []
        for blk in blocks:
            g_b, mean_b, inv_b = gv[blk], mean_d[blk], invstd[blk]
            if grad:
                prod = g_b * d
            else:
                d = torch.sub(xv[blk], shift[blk], out=d_buf[: blk.stop - blk.start])  # (kb, n, ...)
                prod = torch.mul(g_b, d, out=dxv[blk])
            sum_g = g_b.sum(dim=dims, keepdim=True)  # (kb, 1, ...) per (g, c)
            # sum gy * (x - mu) = sum gy * d - mean_d * sum gy;  x_hat = (x - mu) * invstd
            sum_gc = prod.sum(dim=dims, keepdim=True) - mean_b * sum_g
            sums.append((sum_g, sum_gc * inv_b))
            if need_x:
                # dx = scale * (gy - sum_g / m) + coef * (d - mean_d),  coef = -scale * invstd^2 * sum_gc / m
                scale = inv_b if w is None else inv_b * w
                coef = -(scale * inv_b * inv_b * sum_gc) / m
                const = -(scale * sum_g) / m - coef * mean_b
                if grad:
                    pieces.append(torch.addcmul(torch.addcmul(const, g_b, scale), d, coef))
                else:
                    torch.addcmul(const, g_b, scale, out=prod).addcmul_(d, coef)  # into dxv[blk]
        sum_g, sum_gxhat = (torch.cat(t) for t in zip(*sums)) if len(sums) > 1 else sums[0]
        dx = None
        if need_x:
            dx = _ghost_unview((pieces[0] if grad else dxv).to(x.dtype), x)
        dw = sum_gxhat.sum(0).reshape(-1).to(weight.dtype) if (need_w and weight is not None) else None
        db = sum_g.sum(0).reshape(-1).to(bias_dtype) if (need_b and bias_dtype is not None) else None
        return dx, dw, db, None, None


def _ghost_train(
    x: Tensor, v: int, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Ghost-batch training forward of a non-empty x (N, C, *).

    Returns (y, mean, var_biased) where y is differentiable and mean/var (C,) are the detached
    whole-batch statistics (in the accumulation dtype) for the running-statistics update.

    The G full ghost batches are ONE :class:`_GhostTrain` call on a view (G, v, C, S) of x
    (per-(ghost batch, channel) statistics by torch reductions over v and S, no copy); a
    smaller tail ghost batch is a second call. The whole-batch statistics are pooled from
    the ghost ones (Chan's merge, :func:`_pool`), in float64.
    """
    n = x.shape[0]
    per_sample = x[0, 0].numel()  # S = prod(spatial): values of one channel in one sample
    g, t = _ghost_split(n, per_sample, v)
    outputs: list[Tensor] = []
    parts: list[tuple[int, Tensor, Tensor]] = []  # (values per channel, mean (K, C), var (K, C))
    # split, not slices: its backward is one cat, a slice's a zero-filled full-size gradient
    full, tail = x.split([g * v, t]) if (g > 0 and t > 0) else ((x, None) if g > 0 else (None, x))
    if full is not None:
        yf, mean_f, var_f = _GhostTrain.apply(full, weight, bias, eps, g)  # (G*v, C, *), (G, C), (G, C)
        outputs.append(yf)
        parts.append((v * per_sample, mean_f, var_f))
    if tail is not None:
        yt, mean_t, var_t = _GhostTrain.apply(tail, weight, bias, eps, 1)  # (T, C, *), (1, C), (1, C)
        outputs.append(yt)
        parts.append((t * per_sample, mean_t, var_t))
    y = torch.cat(outputs) if len(outputs) > 1 else outputs[0]
    if x.dim() in (4, 5) and _format(x) != torch.contiguous_format:
        y = y.contiguous(memory_format=_format(x))  # keep channels_last(_3d)
    with torch.no_grad():
        mean, m2, total = _pool(*parts[0])
        if len(parts) > 1:
            # Chan's merge of the full ghost batches (count total) with the tail (count total_t)
            mean_t, m2_t, total_t = _pool(*parts[1])
            n = total + total_t
            delta = mean_t - mean
            mean = mean + delta * (total_t / n)
            m2 = m2 + m2_t + delta.square() * (total * total_t / n)
            total = n
        acc = parts[0][2].dtype
        var = (m2 / total).clamp_min(0.0)
    return y, mean.to(acc), var.to(acc)


def _pool(size: int, means: Tensor, variances: Tensor) -> tuple[Tensor, Tensor, int]:
    """(mean, M2, count) per channel, in float64, of K ghost batches of ``size`` values each,
    from their means and biased variances (K, C): the total variance is the mean of the
    within-batch variances plus the spread of the batch means (equal counts: Chan's merge
    reduces to this). mean (C,), M2 = sum of squared deviations (C,)."""
    means = means.double()  # (K, C)
    mean = means.mean(0)  # (C,)
    m2 = (variances.double().sum(0) + (means - mean).square().sum(0)) * size  # (C,)
    return mean, m2, size * means.shape[0]


def ghost_batch_norm(
    input: Tensor,
    virtual_batch_size: int,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """Training-mode ghost batch norm (see the module docstring for the formulas).

    If ``running_mean``/``running_var`` are given they get ONE in-place update with the
    whole-batch mean and unbiased variance. (For inference use :func:`batchnorm.batch_norm`.)

    Shape: input (N, C, *) -> output of the same shape and dtype.
    """
    where = "ghost_batch_norm"
    v = _check_virtual_batch_size(virtual_batch_size, where)
    _checks.check_args(
        input,
        where,
        training=True,
        eps=eps,
        weight=weight,
        bias=bias,
        running_mean=running_mean,
        running_var=running_var,
    )
    momentum = _checks.check_momentum(momentum, where, allow_none=False)  # type: ignore[assignment]
    y, updated = _ghost_batch_norm(input, v, running_mean, running_var, weight, bias, momentum, eps, where)
    warn_if_skipped(updated, input, where)
    return y


def _ghost_batch_norm(
    x: Tensor,
    v: int,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    momentum: float,
    eps: float,
    where: str,
) -> tuple[Tensor, bool | None]:
    _checks.check_batch_size(x, where)
    c = x.shape[1]
    if x.numel() == 0:
        zeros = torch.zeros(c, dtype=torch_ops.acc_dtype(x.dtype), device=x.device)
        return torch_ops.normalize(x, zeros, zeros + 1, weight, bias), False if running_mean is not None else None
    if v * x[0, 0].numel() == 1:
        raise ValueError(
            f"{where}: expected more than 1 value per channel in each ghost batch when training, got "
            f"virtual_batch_size={v} with input of shape {tuple(x.shape)} (one value has no variance: "
            "the output would be the constant bias, with no gradient); use virtual_batch_size >= 2"
        )
    y, mean, var = _ghost_train(x, v, weight, bias, eps)
    if running_mean is None:
        return y, None
    count = x.numel() // c
    return y, update_running_stats(running_mean, running_var, mean, var, count, momentum)


def ghost_batch_norm_layer(
    input: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    num_batches_tracked: Tensor | None,
    training: bool,
    track_running_stats: bool,
    momentum: float | None,
    eps: float,
    virtual_batch_size: int,
    ndims: tuple[int, ...],
    num_features: int,
    where: str,
) -> Tensor:
    """One forward of a ``GhostBatchNorm*d`` from its state: the node a torch.fx trace records.

    Training: ghost-batch normalization and ONE running update with the whole batch's
    statistics (module docstring); evaluation: plain batch norm. Same checks and in-place
    updates as the module; registered with ``torch.fx.wrap``.

    Shape: input (N, C, *) with ``input.dim() in ndims`` -> output of the same shape.
    """
    if not training:
        return batch_norm_layer(
            input, weight, bias, running_mean, running_var, num_batches_tracked,
            False, track_running_stats, momentum, eps, ndims, num_features, where,
        )
    _checks.check_input(input, where, ndims=ndims, num_features=num_features)
    y, updated = _ghost_layer_step(
        input, weight, bias, running_mean, running_var, num_batches_tracked,
        track_running_stats, momentum, eps, virtual_batch_size, where,
    )
    record_update_traced(updated, num_batches_tracked, input, where)
    return y


def _ghost_layer_step(
    input: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    num_batches_tracked: Tensor | None,
    track_running_stats: bool,
    momentum: float | None,
    eps: float,
    virtual_batch_size: int,
    where: str,
) -> tuple[Tensor, bool | None]:
    """The training forward of a ghost layer on a checked input: (y, updated)."""
    _checks.check_eps(eps, where, training=True)
    update = track_running_stats
    return _ghost_batch_norm(
        input,
        virtual_batch_size,
        running_mean if update else None,
        running_var if update else None,
        weight,
        bias,
        momentum_now(momentum, num_batches_tracked) if update else 0.0,
        eps,
        where,
    )


torch.fx.wrap("ghost_batch_norm_layer")  # a graph node under symbolic_trace, the plain function otherwise


class GhostBatchNormBase(BatchNormBase):
    """Ghost batch norm; subclasses set ``_ndims``. See the module docstring for the math.

        training:  y = weight * (x - mu_g) / sqrt(var_g + eps) + bias   for x in ghost batch g
        eval:      y = weight * (x - running_mean) / sqrt(running_var + eps) + bias

    One running update per step with the whole batch's mean and unbiased (pooled) variance.

    Args:
        num_features: C, the number of channels (dim 1 of the input).
        virtual_batch_size: samples per ghost batch (along N); the last one may be smaller.
        eps, momentum, affine, track_running_stats, device, dtype, bias: as ``nn.BatchNorm*d``
            (momentum: weight of the new value, default 0.1; None: cumulative average).
    """

    def __init__(
        self,
        num_features: int,
        virtual_batch_size: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias)
        self.virtual_batch_size = _check_virtual_batch_size(virtual_batch_size, self._where())

    def forward(self, input: Tensor) -> Tensor:
        """Ghost-batch normalize ``input`` (N, C, *) in training; plain BN in eval."""
        if is_fx_proxy(input):
            return self._traced_forward(input)
        if not self.training:
            return super().forward(input)
        self._check_input_dim(input)
        where = self._where()
        y, updated = _ghost_layer_step(
            input,
            self.weight,
            self.bias,
            self.running_mean,
            self.running_var,
            self.num_batches_tracked,
            self.track_running_stats,
            self.momentum,
            self.eps,
            self.virtual_batch_size,
            where,
        )
        record_update(self, updated, input, where)
        return y

    def _traced_forward(self, input: Tensor) -> Tensor:
        """Under torch.fx symbolic tracing: one ``ghost_batch_norm_layer`` node (any mode)."""
        return ghost_batch_norm_layer(
            input, *self._layer_state(), self.virtual_batch_size, self._ndims, self.num_features, self._where()
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, virtual_batch_size={self.virtual_batch_size}"


class GhostBatchNorm1d(GhostBatchNormBase):
    """Ghost batch norm over (N, C) or (N, C, L); ghost batches split N.

    Shape: input (N, C) or (N, C, L) -> same shape.
    """

    _ndims = (2, 3)


class GhostBatchNorm2d(GhostBatchNormBase):
    """Ghost batch norm over (N, C, H, W); ghost batches split N, statistics over n_g*H*W values.

    Shape: input (N, C, H, W) -> same shape.
    """

    _ndims = (4,)


class GhostBatchNorm3d(GhostBatchNormBase):
    """Ghost batch norm over (N, C, D, H, W); ghost batches split N.

    Shape: input (N, C, D, H, W) -> same shape.
    """

    _ndims = (5,)
