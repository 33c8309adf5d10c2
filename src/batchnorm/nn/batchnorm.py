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

torch.fx: ``symbolic_trace`` enters our ``forward`` (torch's own BN layers are leaf modules of
the default tracer, ours are not). On a ``torch.fx.Proxy`` input the layer skips its Python
checks and records ONE ``call_function`` of :func:`batch_norm_layer` (registered with
``torch.fx.wrap``), whose arguments are the input, the layer's parameters and buffers
(``get_attr``) and its settings. Running the graph does the layer's work, with the checks and the
in-place running-statistics update. As for any fx trace of ``F.batch_norm(..., self.training)``,
the mode (train/eval) is the one at trace time: trace the model in the mode it will run in.
A non-finite batch then warns on every call (the once-per-layer flag lives on the module).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.fx
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm as _TorchBatchNorm

from .. import _checks
from ..functional import _batch_norm

__all__ = [
    "BatchNormBase",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "batch_norm_layer",
    "is_fx_proxy",
    "layer_step",
    "momentum_now",
    "record_update",
    "record_update_traced",
]

Normalize = Callable[[Tensor, "Tensor | None", "Tensor | None", bool, float, str], "tuple[Tensor, bool | None]"]
"""``normalize(x, running_mean, running_var, use_batch_stats, momentum, where) -> (y, updated)``."""


def is_fx_proxy(input: object) -> bool:
    """True when ``input`` is a ``torch.fx.Proxy``: ``symbolic_trace`` is running our forward.

    Checked on the input rather than with ``is_fx_tracing()``: ``make_fx``/``torch.export`` also
    run under an fx tracer but hand real (fake) tensors to forward, which take the eager path.
    """
    return isinstance(input, torch.fx.Proxy)


def momentum_now(momentum: float | None, num_batches_tracked: Tensor | None) -> float:
    """The EMA factor for this step: ``momentum``, or 1/(batches so far + 1) if None."""
    if momentum is not None:
        return float(momentum)
    if num_batches_tracked is None:
        raise ValueError("momentum=None (cumulative average) needs num_batches_tracked, got None")
    return 1.0 / (int(num_batches_tracked.item()) + 1)


def layer_step(
    normalize: Normalize,
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    num_batches_tracked: Tensor | None,
    training: bool,
    track_running_stats: bool,
    momentum: float | None,
    where: str,
) -> tuple[Tensor, bool | None]:
    """The mode logic of a BatchNorm*d forward, shared by the module and :func:`batch_norm_layer`.

    Training normalizes with batch statistics and, with ``track_running_stats``, updates the
    running statistics; evaluation uses the running statistics, or batch statistics when there
    are none. Returns (y, updated) as ``normalize`` does; the caller advances the counter.
    """
    use_batch_stats = training or running_mean is None
    update = training and track_running_stats
    keep = update or not use_batch_stats
    return normalize(
        input,
        running_mean if keep else None,
        running_var if keep else None,
        use_batch_stats,
        momentum_now(momentum, num_batches_tracked) if update else 0.0,
        where,
    )


def record_update_traced(updated: bool | None, num_batches_tracked: Tensor | None, input: Tensor, where: str) -> None:
    """:func:`record_update` for a traced graph, which has no module: advance the counter when
    the running statistics took the batch, else warn (on every skipped batch)."""
    if updated and num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    elif updated is False and input.numel() > 0:
        warnings.warn(
            f"{where}: batch statistics are not finite (NaN/inf in the input); running "
            "statistics and num_batches_tracked were left unchanged",
            RuntimeWarning,
            stacklevel=3,
        )


def batch_norm_layer(
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
    ndims: tuple[int, ...],
    num_features: int,
    where: str,
) -> Tensor:
    """One forward of a ``BatchNorm*d`` from its state: the node a torch.fx trace records.

    Same checks, output and in-place update of ``running_mean``/``running_var``/
    ``num_batches_tracked`` as the module's forward in mode ``training`` (see the module
    docstring). Registered with ``torch.fx.wrap``: called with a Proxy it becomes one graph node.

    Shape: input (N, C, *) with ``input.dim() in ndims`` -> output of the same shape.
    """
    _checks.check_input(input, where, ndims=ndims, num_features=num_features)

    def normalize(
        x: Tensor, rm: Tensor | None, rv: Tensor | None, batch: bool, m: float, w: str
    ) -> tuple[Tensor, bool | None]:
        return _batch_norm(x, rm, rv, weight, bias, batch, m, eps, w)

    y, updated = layer_step(
        normalize, input, running_mean, running_var, num_batches_tracked, training, track_running_stats, momentum, where
    )
    record_update_traced(updated, num_batches_tracked, input, where)
    return y


# During symbolic_trace a call of batch_norm_layer with a Proxy argument becomes a graph node
# (call_function) instead of running; outside tracing the name is the plain function.
torch.fx.wrap("batch_norm_layer")


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
        return momentum_now(self.momentum, self.num_batches_tracked)

    def forward(self, input: Tensor) -> Tensor:
        """Normalize ``input`` of shape (N, C, *) per channel; see the module docstring."""
        if is_fx_proxy(input):
            return self._traced_forward(input)
        self._check_input_dim(input)
        where = self._where()
        y, updated = layer_step(
            self._normalize,
            input,
            self.running_mean,
            self.running_var,
            self.num_batches_tracked,
            self.training,
            self.track_running_stats,
            self.momentum,
            where,
        )
        record_update(self, updated, input, where)
        return y

    def _traced_forward(self, input: Tensor) -> Tensor:
        """Under torch.fx symbolic tracing: one ``batch_norm_layer`` node (subclasses record theirs)."""
        return batch_norm_layer(input, *self._layer_state(), self._ndims, self.num_features, self._where())

    def _layer_state(self) -> tuple[Any, ...]:
        """(weight, bias, running_mean, running_var, num_batches_tracked, training,
        track_running_stats, momentum, eps): the arguments after the input that every traced
        layer function takes (under fx the tensors become ``get_attr`` nodes)."""
        return (
            self.weight,
            self.bias,
            self.running_mean,
            self.running_var,
            self.num_batches_tracked,
            self.training,
            self.track_running_stats,
            self.momentum,
            self.eps,
        )

    def _normalize(
        self,
        input: Tensor,
        running_mean: Tensor | None,
        running_var: Tensor | None,
        use_batch_stats: bool,
        momentum: float,
        where: str,
    ) -> tuple[Tensor, bool | None]:
        """The functional work of :meth:`forward` (subclasses fuse more into it)."""
        return _batch_norm(
            input, running_mean, running_var, self.weight, self.bias, use_batch_stats, momentum, self.eps, where
        )


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
