"""``GhostBatchNorm1d/2d/3d``: batch norm over "ghost" (virtual) batches (Hoffer et al. 2017).

Training splits the batch along N into consecutive ghost batches of ``virtual_batch_size``
samples, B_1, ..., B_G, and normalizes each with its own statistics:

    for x in B_g:   y = weight * (x - mu_g) / sqrt(var_g + eps) + bias
    mu_g  = mean of B_g,   var_g = biased variance of B_g        (per channel, over N_g * spatial)

All full ghost batches are normalized by ONE call of our batch-norm kernel (forward and
hand-derived backward), with no Python loop over chunks: viewed as (v, G*C, S), each
(ghost batch, channel) pair is a channel of its own. When N is not a multiple of
``virtual_batch_size`` the last ghost batch is smaller and is a second kernel call; if it would
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
from .._kernels.dispatch import _numba
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
    """An uninitialized tensor of ``like``'s shape in ``dtype``; on CPU, large ones come from the
    kernels' output pool (:mod:`batchnorm._kernels.outpool`) when the numba back-end is
    installed: a fresh multi-MB tensor costs page faults on first touch, which measured 3-5x
    the time of the elementwise pass that fills it."""
    if like.device.type == "cpu" and _numba() is not None:
        from .._kernels import outpool

        out = outpool.empty_like(like.contiguous() if not like.is_contiguous() else like, dtype)
        if out is not None:
            return out
    return torch.empty(like.shape, dtype=dtype, device=like.device)


def _ghost_moments(
    xv: Tensor, dims: tuple[int, ...], acc: torch.dtype, out: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(centred, shift, mean_d, var) of ghost-batch view ``xv``, statistics over ``dims``;
    ``out`` (shape of xv, in acc) is scratch for the squares when not differentiating.

    d = x - shift, with shift the first value of each (ghost batch, channel): exact for values
    within a factor 2 of it (Sterbenz), so for mean 1e4 and std 1e-2 in float32 d holds the
    spread, not the magnitude. Then the two-pass mean and biased variance of d:
    centred = d - mean_d = x - mean(x), var = mean(centred^2); mean(x) = shift + mean_d (the
    caller forms it in float64). (``torch.var_mean`` over these middle dims measured 20x slower
    than the sums on CPU, ``vector_norm`` 8x.) Differentiable in ``xv`` under grad mode.
    """
    first = xv.detach()[:, :1, :1] if dims == (1, 2) else xv.detach()[:, :1, :, :1]
    shift = first.to(acc)  # (k, 1, 1, C) or (k, 1, C, 1)
    if torch.is_grad_enabled():
        d = xv.to(acc) - shift  # (k, n, ...) in acc
    else:
        d = torch.sub(xv, shift, out=_scratch(xv, acc))  # (k, n, ...) in acc, a new tensor
    m = d.numel() // shift.numel()  # values per (ghost batch, channel)
    mean_d = d.sum(dim=dims, keepdim=True) / m
    if torch.is_grad_enabled():  # differentiable (double backward)
        centred = d - mean_d
        squares = centred * centred
    else:  # in place where possible: a fresh multi-MB tensor costs page faults (3x an in-place pass)
        centred = d.sub_(mean_d)
        squares = torch.mul(centred, centred, out=out) if out is not None else centred * centred
    var = squares.sum(dim=dims, keepdim=True) / m
    return centred, shift, mean_d, var


class _GhostTrain(torch.autograd.Function):
    """y, mean, var = ghost-batch BN of x (k*n, C, *) in k ghost batches of n samples each.

    Forward, per (ghost batch g, channel c) over its m = n * S values (DESIGN.md):
        x_hat = (x - mu_gc) / sqrt(var_gc + eps),   y = weight_c * x_hat + bias_c
    Backward (hand-derived, per (g, c), with grad gy and centred = x - mu_gc):
        dx = scale * (gy - mean(gy)) - centred * scale * invstd * mean(gy * centred) * invstd ...
           = weight_c * invstd * (gy - mean(gy) - x_hat * mean(gy * x_hat))
        dweight_c = sum_g sum gy * x_hat,   dbias_c = sum_g sum gy
    All on a strided view of x (no transposition, no per-chunk loop): about ten elementwise
    passes or reductions in all, forward and backward. Statistics in ``acc_dtype`` (float32;
    float64 for float64 input) on shifted values (:func:`_ghost_moments`). Saved for backward:
    x and ``centred`` (in acc), i.e. one tensor more than plain BN, for a backward without
    recomputation. mean (float64) and var (acc) have shape (k, C). The backward is itself
    differentiable (``create_graph=True``: it recomputes from x).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, k: int
    ) -> tuple[Tensor, Tensor, Tensor]:
        acc = torch_ops.acc_dtype(x.dtype)
        xv, dims, per_channel = _ghost_view(x, k)
        yv = _scratch(xv, acc)  # scratch for the squares, then y
        centred, shift, mean_d, var = _ghost_moments(xv, dims, acc, out=yv)
        invstd = torch.rsqrt(var + eps)  # (k, 1, C, 1) or (k, 1, 1, C)
        scale = invstd if weight is None else invstd * weight.to(acc).reshape(per_channel)
        torch.mul(centred, scale, out=yv)  # y = (x - mu) * weight * invstd + bias, in place
        if bias is not None:
            yv.add_(bias.to(acc).reshape(per_channel))
        y = _ghost_unview(yv.to(x.dtype), x)
        ctx.save_for_backward(x, weight, centred, invstd)
        ctx.meta = (eps, k, bias.dtype if bias is not None else None)
        mean = (shift.double() + mean_d.double()).reshape(k, -1)  # (k, C)
        var = var.reshape(k, -1)
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    def backward(ctx, grad_y: Tensor, _gmean: Tensor, _gvar: Tensor):  # type: ignore[override]
        x, weight, centred, invstd = ctx.saved_tensors
        eps, k, bias_dtype = ctx.meta
        acc = invstd.dtype
        xv, dims, per_channel = _ghost_view(x, k)
        if torch.is_grad_enabled():
            # create_graph=True: recompute the statistics differentiably, so that autograd sees
            # how mean and invstd depend on x, and differentiate the formulas below themselves
            centred, _, _, var = _ghost_moments(xv, dims, acc)
            invstd = torch.rsqrt(var + eps)
        gv, _, _ = _ghost_view(grad_y, k)
        gv = gv.to(acc)
        m = xv.numel() // invstd.numel()  # values per (ghost batch, channel)
        sum_g = gv.sum(dim=dims, keepdim=True)  # (k, 1, ...) per (g, c)
        prod = gv * centred if torch.is_grad_enabled() else torch.mul(gv, centred, out=_scratch(gv, acc))  # reused for dx
        sum_gc = prod.sum(dim=dims, keepdim=True)  # sum g * (x - mu); x_hat = centred * invstd
        scale = invstd if weight is None else invstd * weight.to(acc).reshape(per_channel)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dx = None
        if need_x:
            # dx = scale * (g - sum_g / m) - centred * (scale * invstd^2 * sum_gc / m)
            shift_g = -(scale * sum_g) / m
            coef = -(scale * invstd * invstd * sum_gc) / m
            if torch.is_grad_enabled():
                dxv = torch.addcmul(torch.addcmul(shift_g, gv, scale), centred, coef)
            else:
                dxv = torch.mul(gv, scale, out=prod).add_(shift_g).addcmul_(centred, coef)  # in place
            dx = _ghost_unview(dxv.to(x.dtype), x)
        dw = None
        if need_w and weight is not None:
            dw = (sum_gc * invstd).sum(0).reshape(-1).to(weight.dtype)  # sum over ghost batches: (C,)
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
    smaller tail ghost batch is a second call. So there are at most two calls, whatever G is.
    """
    n, c = x.shape[0], x.shape[1]
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
        # Chan's merge of the ghost (count, mean, M2) into the whole batch's, in float64
        counts = [torch.full((m.shape[0],), float(k), dtype=torch.float64, device=x.device) for k, m, _ in parts]
        sizes = torch.cat(counts)  # (G + 1,) values per channel of each ghost batch
        means = torch.cat([m for _, m, _ in parts]).double()  # (G + 1, C)
        m2s = torch.cat([var for _, _, var in parts]).double() * sizes[:, None]  # (G + 1, C)
        total = sizes.sum()
        mean = (sizes[:, None] * means).sum(0) / total  # (C,)
        m2 = m2s.sum(0) + (sizes[:, None] * (means - mean).square()).sum(0)  # (C,)
        acc = parts[0][2].dtype
        var = (m2 / total).clamp_min(0.0)
    return y, mean.to(acc), var.to(acc)


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
        params={"weight": weight, "bias": bias, "running_mean": running_mean, "running_var": running_var},
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
            input,
            self.weight,
            self.bias,
            self.running_mean,
            self.running_var,
            self.num_batches_tracked,
            self.training,
            self.track_running_stats,
            self.momentum,
            self.eps,
            self.virtual_batch_size,
            self._ndims,
            self.num_features,
            self._where(),
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
