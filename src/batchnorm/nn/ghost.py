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
from ..functional import _BatchNormTrain, _format, update_running_stats, warn_if_skipped
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


def _ghost_train(
    x: Tensor, v: int, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Ghost-batch training forward of a non-empty x (N, C, *).

    Returns (y, mean, var_biased) where y is differentiable and mean/var (C,) are the detached
    whole-batch statistics (in the accumulation dtype) for the running-statistics update.

    The G full ghost batches are ONE plain batch norm: viewed as (v, G*C, S), every
    (ghost batch, channel) pair is a channel of its own, normalized over its v*S values by our
    BN kernel (forward and the hand-derived backward), with weight and bias repeated G times
    (autograd sums their gradients over the ghost batches). A smaller tail ghost batch is a
    second BN call. So there are at most two kernel calls, whatever G is.
    """
    n, c = x.shape[0], x.shape[1]
    per_sample = x[0, 0].numel()  # S = prod(spatial): values of one channel in one sample
    g, t = _ghost_split(n, per_sample, v)
    outputs: list[Tensor] = []
    parts: list[tuple[int, Tensor, Tensor]] = []  # (values per channel, mean (K, C), var (K, C))
    if g > 0:
        xf = x[: g * v].reshape(g, v, c, per_sample)  # (G, v, C, S)
        xf = xf.transpose(0, 1).reshape(v, g * c, per_sample)  # (v, G*C, S), a copy
        wf = weight.repeat(g) if weight is not None else None  # (G*C,)
        bf = bias.repeat(g) if bias is not None else None
        yf, mean_f, var_f = _BatchNormTrain.apply(xf, wf, bf, eps)  # (v, G*C, S), (G*C,), (G*C,)
        yf = yf.reshape(v, g, c, per_sample).transpose(0, 1)  # (G, v, C, S)
        outputs.append(yf.reshape(g * v, *x.shape[1:]))  # (G*v, C, *)
        parts.append((v * per_sample, mean_f.reshape(g, c), var_f.reshape(g, c)))
    if t > 0:
        yt, mean_t, var_t = _BatchNormTrain.apply(x[g * v:], weight, bias, eps)  # (T, C, *)
        outputs.append(yt)
        parts.append((t * per_sample, mean_t.reshape(1, c), var_t.reshape(1, c)))
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
        acc = parts[0][1].dtype
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
