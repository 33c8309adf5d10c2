"""``BatchNorm1d/2d/3d``: exact drop-ins for ``torch.nn.BatchNorm*d``, computed by our kernels.

    y = weight * (x - E[x]) / sqrt(Var[x] + eps) + bias

Training normalizes with the batch's mean and *biased* variance and updates the running
statistics (``running = (1 - momentum) * running + momentum * batch``, PyTorch's convention;
``momentum=None`` gives the cumulative average 1/num_batches_tracked); ``running_var`` stores
the *unbiased* batch variance, exactly as PyTorch, so checkpoints move both ways unchanged
(same constructor arguments, parameters, buffers and ``state_dict`` keys). Evaluation uses the
running statistics, or batch statistics when ``track_running_stats=False``.

Where PyTorch misbehaves we do better:
- a batch with non-finite statistics never writes into the running statistics nor the
  counter (the NaN still reaches the output, so a loss scaler notices); one warning per layer;
- an empty batch changes no running statistic and not ``num_batches_tracked``;
- bad input raises ``ValueError``/``TypeError`` naming the layer, what was expected and what
  arrived (momentum outside [0, 1] is refused at construction).

The classes subclass ``torch.nn.modules.batchnorm._BatchNorm`` so that code which looks for
"any batch norm" (``isinstance(m, _BatchNorm)``: ``swa_utils.update_bn``, timm, fvcore) finds them.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm as _TorchBatchNorm

from .. import _checks
from ..functional import _batch_norm

__all__ = ["BatchNormBase", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "record_update"]


def record_update(module: torch.nn.Module, updated: bool | None, input: Tensor, where: str) -> None:
    """Bookkeeping after a training step of any of our batch-norm layers.

    ``updated`` is what the functional form returned: True -> the running statistics took the
    batch, so ``num_batches_tracked`` (the step counter) advances; False on a non-empty input ->
    the batch statistics were not finite and nothing was written: warn, once per layer; None ->
    nothing to update. The module needs ``num_batches_tracked`` and ``_warned_nonfinite``.
    """
    if updated:
        module.num_batches_tracked.add_(1)
    elif updated is False and input.numel() > 0 and not module._warned_nonfinite:
        module._warned_nonfinite = True
        warnings.warn(
            f"{where}: batch statistics are not finite (NaN/inf in the input); running "
            "statistics and num_batches_tracked were left unchanged (warned once per layer)",
            RuntimeWarning,
            stacklevel=3,
        )


class BatchNormBase(_TorchBatchNorm):
    """Shared implementation of our BatchNorm*d; subclasses set ``_ndims`` (accepted input ranks).

    Args:
        num_features: C, the number of channels (dim 1 of the input).
        eps: added to the variance inside the square root; > 0 to train.
        momentum: weight of the new batch statistic in the running average (PyTorch
            convention, default 0.1); None for the cumulative average.
        affine: learn a per-channel scale ``weight`` (init 1) and shift ``bias`` (init 0).
        track_running_stats: keep ``running_mean``/``running_var``/``num_batches_tracked``;
            if False, batch statistics are used in eval mode too.
        bias: with ``affine``, whether to learn the shift (PyTorch >= 2.7 argument).
    """

    _ndims: tuple[int, ...] = (2, 3, 4, 5)

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
    ) -> None:
        where = f"{type(self).__name__}({num_features})"
        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"{type(self).__name__}: expected num_features to be a positive int, got {num_features!r}")
        _checks.check_eps(eps, where, training=False)
        _checks.check_momentum(momentum, where, allow_none=True)
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        if affine and not bias:
            self.register_parameter("bias", None)
        self._warned_nonfinite = False

    def _where(self) -> str:
        return f"{type(self).__name__}({self.num_features})"

    def _check_input_dim(self, input: Tensor) -> None:
        _checks.check_input(input, self._where(), ndims=self._ndims, num_features=self.num_features)

    def _momentum_now(self) -> float:
        """The EMA factor for this step: ``momentum``, or 1/(batches so far + 1) if None."""
        if self.momentum is not None:
            return float(self.momentum)
        return 1.0 / (int(self.num_batches_tracked.item()) + 1)

    def forward(self, input: Tensor) -> Tensor:
        """Normalize ``input`` of shape (N, C, *) per channel; see the module docstring."""
        self._check_input_dim(input)
        where = self._where()
        use_batch_stats = self.training or self.running_mean is None
        update = self.training and self.track_running_stats
        y, updated = _batch_norm(
            input,
            self.running_mean if (update or not use_batch_stats) else None,
            self.running_var if (update or not use_batch_stats) else None,
            self.weight,
            self.bias,
            use_batch_stats,
            self._momentum_now() if update else 0.0,
            self.eps,
            where,
        )
        record_update(self, updated, input, where)
        return y


class BatchNorm1d(BatchNormBase):
    """Batch norm over a 2D (N, C) or 3D (N, C, L) input; drop-in for ``torch.nn.BatchNorm1d``.

    Shape: input (N, C) or (N, C, L) -> output of the same shape; statistics over N (and L).
    """

    _ndims = (2, 3)


class BatchNorm2d(BatchNormBase):
    """Batch norm over a 4D (N, C, H, W) input; drop-in for ``torch.nn.BatchNorm2d``.

    Shape: input (N, C, H, W) -> same shape, dtype and memory format (channels_last kept);
    statistics per channel over N*H*W values.
    """

    _ndims = (4,)


class BatchNorm3d(BatchNormBase):
    """Batch norm over a 5D (N, C, D, H, W) input; drop-in for ``torch.nn.BatchNorm3d``.

    Shape: input (N, C, D, H, W) -> same shape; statistics per channel over N*D*H*W values.
    """

    _ndims = (5,)
