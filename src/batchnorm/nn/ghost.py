"""``GhostBatchNorm1d/2d/3d``: batch norm over "ghost" (virtual) batches (Hoffer et al. 2017).

Training splits the batch along N into consecutive ghost batches of ``virtual_batch_size``
samples, B_1, ..., B_G, and normalizes each with its own statistics:

    for x in B_g:   y = weight * (x - mu_g) / sqrt(var_g + eps) + bias
    mu_g  = mean of B_g,   var_g = biased variance of B_g        (per channel, over N_g * spatial)

All ghost batches are normalized in one vectorized pass (a per-sample group index and
``index_add`` reductions; no Python loop over chunks). When N is not a multiple of
``virtual_batch_size`` the last ghost batch is smaller; if it would hold a single value per
channel (no variance: its output would be the constant ``bias`` and carry no gradient) it is
merged into the previous ghost batch instead.

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

import warnings

import torch
from torch import Tensor

from .. import _checks
from .._kernels import torch_ops
from ..functional import update_running_stats
from .batchnorm import BatchNormBase

__all__ = ["ghost_batch_norm", "GhostBatchNormBase", "GhostBatchNorm1d", "GhostBatchNorm2d", "GhostBatchNorm3d"]


def _check_virtual_batch_size(v: object, where: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{where}: expected virtual_batch_size to be a positive int, got {v!r}")
    return v


def _ghost_groups(n: int, per_sample: int, v: int, device: torch.device) -> tuple[Tensor, int]:
    """Group index (N,) of each sample and the number of ghost batches G.

    Samples [g*v, (g+1)*v) form ghost batch g; a last ghost batch with a single value per
    channel (one sample, no spatial extent) is merged into the previous one.
    """
    g = -(-n // v)
    if g > 1 and (n - (g - 1) * v) * per_sample == 1:
        g -= 1
    group = torch.div(torch.arange(n, device=device), v, rounding_mode="floor").clamp_max(g - 1)
    return group, g


def _ghost_train(
    x: Tensor, v: int, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Ghost-batch training forward of a non-empty x (N, C, *).

    Returns (y, mean, var_biased) where y is differentiable and mean/var (C,) are the detached
    whole-batch statistics (in the accumulation dtype) for the running-statistics update.
    """
    acc = torch_ops.acc_dtype(x.dtype)
    n, c = x.shape[0], x.shape[1]
    nd = x.dim()
    per_sample = x[0, 0].numel()  # values of one channel in one sample: prod(spatial)
    group, g = _ghost_groups(n, per_sample, v, x.device)
    sizes = torch.bincount(group, minlength=g).to(acc) * per_sample  # (G,) values per channel
    xa = x.to(acc)
    # subtract each channel's first value first (as torch_ops.batch_stats): exact in floating
    # point, and it keeps mean 1e4 / std 1e-2 data from cancelling in float32
    shift = xa[:1].detach().reshape(1, c, -1)[..., :1]  # (1, C, 1)
    shift = shift.reshape(1, c, *([1] * (nd - 2)))  # (1, C, 1, ...)
    d = xa - shift  # (N, C, *)

    def per_group_sum(t: Tensor) -> Tensor:
        per_n = t.reshape(n, c, -1).sum(-1)  # (N, C)
        return torch.zeros(g, c, dtype=acc, device=x.device).index_add(0, group, per_n)  # (G, C)

    def expand(t: Tensor) -> Tensor:
        return t[group].reshape(n, c, *([1] * (nd - 2)))  # (G, C) -> (N, C, 1, ...)

    mean_g = per_group_sum(d) / sizes[:, None]  # (G, C)
    centered = d - expand(mean_g)  # (N, C, *)
    m2_g = per_group_sum(centered.square())  # (G, C)
    invstd_g = torch.rsqrt(m2_g / sizes[:, None] + eps)  # (G, C)
    scale_g = invstd_g if weight is None else invstd_g * weight.to(acc)
    y = centered * expand(scale_g)
    if bias is not None:
        y = y + torch_ops.channel_view(bias.to(acc), nd)
    with torch.no_grad():
        # Chan's merge of the ghost (count, mean, M2) into the whole batch's
        total = sizes.sum()
        mean_d = (sizes[:, None] * mean_g).sum(0) / total  # (C,)
        m2 = m2_g.sum(0) + (sizes[:, None] * (mean_g - mean_d).square()).sum(0)  # (C,)
        mean = mean_d + shift.reshape(c)
        var = (m2 / total).clamp_min(0.0)
    return y.to(x.dtype), mean, var


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
    _checks.check_input(input, where)
    c = input.shape[1]
    for name, p in (("weight", weight), ("bias", bias), ("running_mean", running_mean), ("running_var", running_var)):
        _checks.check_param(p, name, c, where)
    _checks.check_eps(eps, where, training=True)
    momentum = _checks.check_momentum(momentum, where, allow_none=False)  # type: ignore[assignment]
    y, updated = _ghost_batch_norm(input, v, running_mean, running_var, weight, bias, momentum, eps, where)
    if updated is False and input.numel() > 0:
        warnings.warn(f"{where}: batch statistics are not finite; running statistics were left unchanged", RuntimeWarning, stacklevel=2)
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
    y, mean, var = _ghost_train(x, v, weight, bias, eps)
    if running_mean is None:
        return y, None
    count = x.numel() // c
    return y, update_running_stats(running_mean, running_var, mean, var, count, momentum)


class GhostBatchNormBase(BatchNormBase):
    """Ghost batch norm; subclasses set ``_ndims``. See the module docstring for the math.

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
        if not self.training:
            return super().forward(input)
        self._check_input_dim(input)
        where = self._where()
        _checks.check_eps(self.eps, where, training=True)
        update = self.track_running_stats
        y, updated = _ghost_batch_norm(
            input,
            self.virtual_batch_size,
            self.running_mean if update else None,
            self.running_var if update else None,
            self.weight,
            self.bias,
            self._momentum_now() if update else 0.0,
            self.eps,
            where,
        )
        if updated:
            self.num_batches_tracked.add_(1)
        elif updated is False and input.numel() > 0 and not self._warned_nonfinite:
            self._warned_nonfinite = True
            warnings.warn(
                f"{where}: batch statistics are not finite (NaN/inf in the input); running "
                "statistics and num_batches_tracked were left unchanged (warned once per layer)",
                RuntimeWarning,
                stacklevel=2,
            )
        return y

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
