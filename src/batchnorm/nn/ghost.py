"""``GhostBatchNorm1d/2d/3d``: batch norm over "ghost" (virtual) batches (Hoffer et al. 2017).

Training splits the batch along N into consecutive ghost batches of ``virtual_batch_size``
samples, B_1, ..., B_G, and normalizes each with its own statistics:

    for x in B_g:   y = weight * (x - mu_g) / sqrt(var_g + eps) + bias
    mu_g  = mean of B_g,   var_g = biased variance of B_g        (per channel, over N_g * spatial)

The work is the operator ``batchnorm::ghost_train`` (`batchnorm.ops.ghost`: one torch op
per step over a strided view of all ghost batches, hand-derived backward ``ghost_train_backward``)
and ``batchnorm::update_running_stats``. When N is not a multiple of ``virtual_batch_size`` the
last ghost batch is smaller; if it would hold a single value per channel (no variance: its
output would be the constant ``bias`` and carry no gradient) it is merged into the previous
ghost batch instead; full ghost batches of one value per channel (``virtual_batch_size=1`` on
(N, C) input) raise ``ValueError``, as ``nn.BatchNorm`` does for a batch of one.

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
from ..functional import check_train_args
from ..ops.ghost import ghost_step
from ._fx import leaf_call, root_call
from .batchnorm import BatchNormBase, batch_norm_layer

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


def _check_ghost_shape(x: Tensor, v: int, where: str) -> None:
    if x.numel() and v * x[0, 0].numel() == 1:
        raise ValueError(
            f"{where}: expected more than 1 value per channel in each ghost batch when training, got "
            f"virtual_batch_size={v} with input of shape {tuple(x.shape)} (one value has no variance: "
            "the output would be the constant bias, with no gradient); use virtual_batch_size >= 2"
        )


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
    whole-batch mean and unbiased variance. (For inference use `batchnorm.batch_norm`.)

    Shape: input (N, C, *) -> output of the same shape and dtype.
    """
    where = "ghost_batch_norm"
    v = _check_virtual_batch_size(virtual_batch_size, where)
    x, eps = check_train_args(
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
    _check_ghost_shape(x, v, where)
    counter = torch.zeros((), dtype=torch.long, device=x.device)  # scratch counters for the update
    return ghost_step(x, weight, bias, running_mean, running_var, counter, counter.clone(), momentum, eps, v, where)


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
    num_batches_skipped: Tensor | None = None,
) -> Tensor:
    """One forward of a ``GhostBatchNorm*d`` from its state (the module's forward).

    Training: ghost-batch normalization and ONE running update with the whole batch's
    statistics (module docstring); evaluation: plain batch norm.

    Shape: input (N, C, *) with ``input.dim() in ndims`` -> output of the same shape.
    """
    if not training:
        return batch_norm_layer(
            input, weight, bias, running_mean, running_var, num_batches_tracked,
            False, track_running_stats, momentum, eps, ndims, num_features, where, num_batches_skipped,
        )  # fmt: skip
    _checks.check_layer_input(input, where, ndims, num_features, True, eps)
    if input.numel() and virtual_batch_size * input[0, 0].numel() == 1:
        _check_ghost_shape(input, virtual_batch_size, where)
    update = track_running_stats and running_mean is not None
    return ghost_step(
        input,
        weight,
        bias,
        running_mean if update else None,
        running_var if update else None,
        num_batches_tracked,  # type: ignore[arg-type]
        num_batches_skipped,  # type: ignore[arg-type]
        momentum,
        eps,
        virtual_batch_size,
        where,
    )


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
        if torch.jit.is_scripting():  # TorchScript compiles only this branch (nn/_script.py)
            return torch.ops.batchnorm.ghost_layer(
                input, self.weight, self.bias, self.running_mean, self.running_var, self.num_batches_tracked,
                self.training, self.track_running_stats, None if self.momentum is None else float(self.momentum),
                float(self.eps), self.virtual_batch_size, self._script_ndims, self.num_features, self._script_where,
                self.num_batches_skipped,
            )  # fmt: skip
        if isinstance(input, torch.fx.Proxy):  # under fx tracing: one node (nn/_fx.py)
            node = leaf_call(self, input)
            if node is not None:
                return node
        args = (
            input, self.weight, self.bias, self.running_mean, self.running_var, self.num_batches_tracked,
            self.training, self.track_running_stats, self.momentum, self.eps, self.virtual_batch_size, self._ndims,
            self.num_features, f"{type(self).__name__}({self.num_features})", self.num_batches_skipped,
        )  # fmt: skip
        if isinstance(input, torch.fx.Proxy):  # the layer is the traced root
            return root_call(self, ghost_batch_norm_layer, args)
        return ghost_batch_norm_layer(*args)

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
