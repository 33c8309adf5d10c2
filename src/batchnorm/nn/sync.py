"""``SyncBatchNorm``: batch norm whose training statistics span every process of a group.

The normalization batch is the *global* batch: the concatenation of the local batches of all
ranks of ``process_group`` (the default group if None). Per channel, over all M = sum_r m_r values:

    mu    = (1/M) sum x                       var = (1/M) sum (x - mu)^2      (biased)
    y     = weight * (x - mu) / sqrt(var + eps) + bias

Forward: each rank computes its (m_r, mean_r, M2_r) locally (``batchnorm::moments``), and ONE
``all_reduce`` gathers them (a (W, 1 + 2C) float64 buffer); every rank then merges them with
Chan's formula in float64 on the device, so uneven batch sizes and ranks with zero samples give
the statistics of the concatenated batch, with no cancellation and no host read. The output is
``batchnorm::eval`` with the global statistics (mean kept in float64). The math lives in
`batchnorm.ops.sync`.

Backward (g = dL/dy, sums over the global batch):

    dx = weight / sqrt(var + eps) * (g - (1/M) sum g - x_hat (1/M) sum g * x_hat)

with ONE ``all_reduce`` of the 2C local sums (sum g, sum g*x_hat), taken by
``batchnorm::backward_sums`` around the float64 global mean (one read of g and x), and dx from
``batchnorm::backward_apply`` with the global means (one more read of g and x, one write).
``weight``/``bias`` get their *local* gradients sum_local g*x_hat and sum_local g;
DistributedDataParallel then reduces them across ranks like every other parameter.
Cost: one blocking collective per layer per pass (docs/distributed.md has measurements).

Running statistics (training, ``track_running_stats``): updated on every rank identically with
the global mean and the global *unbiased* variance var * M / (M - 1) (PyTorch's conventions:
``momentum`` is the weight of the new value, None = cumulative average), so buffers stay
identical across ranks; a rank with no samples updates them too. A step in which the whole
group has at most one value per channel (no variance) leaves them unchanged and counts in
``num_batches_skipped``; its output is ``bias`` (torch's layer raises there, which needs a host
read of the global count).

Without communication: in eval mode (running statistics; with ``track_running_stats=False``
the local batch's statistics, as PyTorch), and when ``torch.distributed`` is not initialized
or the group has one process (then it is exactly `batchnorm.BatchNorm1d`-style BN).

Works on any device the backend supports: gloo with CPU tensors (where
``torch.nn.SyncBatchNorm`` refuses CPU input), nccl with CUDA tensors.

Every rank of the group must call the layer in training mode in the same order, and run the
backward through it if one does (whether the input needs a gradient must agree across ranks).
A peer that does not join makes the collective fail after the process group's timeout
(``init_process_group(timeout=...)``) with a ``RuntimeError`` that says so, instead of hanging
forever. Double backward (``create_graph=True``, gradient penalties) works: that backward is
built from differentiable ops and differentiable all-reduces (two more collectives per layer).

torch.fx: ``symbolic_trace`` records one ``call_module`` node per layer (`batchnorm.nn._fx`):
the graph calls the layer, which decides when the graph runs whether to synchronize (docs/fx.md).
"""

from __future__ import annotations

import torch
import torch.fx
from torch import Tensor

from .. import _checks
from ..distributed import collectives as _collectives
from ..functional import check_mask, update_step_counted
from ..ops.sync import global_moments, sync_normalize
from ._fx import leaf_call, root_call
from .batchnorm import MaskableBatchNorm

__all__ = ["SyncBatchNorm", "sync_batch_norm"]


def sync_step(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    momentum: float | None,
    eps: float,
    group: object | None,
    where: str,
    num_batches_tracked: Tensor | None = None,
    num_batches_skipped: Tensor | None = None,
    mask: Tensor | None = None,
) -> Tensor:
    """Training forward over the group on checked arguments (module docstring): the global
    statistics, the normalize, and the running update with the global unbiased variance.

    With ``mask`` (N_r, *) bool: the statistics of the real positions of all ranks; padded
    positions enter the normalize as the global mean (x_hat = 0) and leave it as 0 (so their
    gradient is 0 and the backward's global sums run over real positions only)."""
    if mask is None:
        total, mean, var = global_moments(x, group, where)
        y = sync_normalize(x, weight, bias, mean, var, total, eps, group, where)
    else:
        check_mask(mask, x, where)
        total, mean, var = global_moments(x, group, where, mask)
        real = mask.unsqueeze(1)  # (N_r, 1, *)
        filled = torch.where(real, x, mean.to(x.dtype).reshape(1, -1, *([1] * (x.dim() - 2))))
        y = sync_normalize(filled, weight, bias, mean, var, total, eps, group, where)
        y = torch.where(real, y, torch.zeros((), dtype=y.dtype, device=y.device))
    # the global unbiased variance, var * M / (M - 1); a group batch of at most one value per
    # channel has none: the update leaves it out and counts it as skipped
    update_step_counted(
        x, running_mean, running_var, mean, var, total, momentum, where, num_batches_tracked, num_batches_skipped
    )
    return y


def sync_batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    momentum: float = 0.1,
    eps: float = 1e-5,
    process_group: object | None = None,
) -> Tensor:
    """Training-mode batch norm with statistics over ``process_group`` (module docstring).

    Every rank of the group must call it (one all_reduce in forward, one in backward). The
    running statistics, if given, are updated in place with the global mean and unbiased
    variance. Requires an initialized ``torch.distributed``.

    Shape: input (N_r, C, *) on each rank (N_r may differ, may be 0) -> same shape.
    """
    where = "sync_batch_norm"
    if not _collectives.is_distributed():
        raise RuntimeError(f"{where}: torch.distributed is not initialized (call init_process_group first)")
    x, eps = _checks.check_args(
        input,
        where,
        training=True,
        eps=eps,
        weight=weight,
        bias=bias,
        running_mean=running_mean,
        running_var=running_var,
    )
    _checks.check_eps(eps, where, training=True)
    momentum = _checks.check_momentum(momentum, where, allow_none=False)  # type: ignore[assignment]
    return sync_step(x, running_mean, running_var, weight, bias, momentum, eps, process_group, where)


class SyncBatchNorm(MaskableBatchNorm):
    """Batch norm synchronized over a process group, on CPU (gloo) and GPU (nccl).

        y = weight * (x - mu) / sqrt(var + eps) + bias,   mu, var (biased) over ALL ranks' x

    running_var stores the unbiased variance with the global count; momentum as PyTorch.

    Args:
        num_features: C, the number of channels (dim 1 of the input).
        eps, momentum, affine, track_running_stats, device, dtype, bias: as ``nn.BatchNorm*d``.
        process_group: the group whose processes share statistics (default: the whole world).

    Shape: input (N_r, C, *) with 2 to 5 dims on each rank -> same shape. N_r may differ
    between ranks and may be 0. Same parameters, buffers and ``state_dict`` keys as
    ``torch.nn.SyncBatchNorm``/``BatchNorm*d``. See the module docstring for the math.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: object | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias)
        self.process_group = process_group

    def _synchronized(self) -> bool:
        """Whether this forward communicates: training and a group of more than one process."""
        return self.training and _collectives.group_size(self.process_group, self._where()) > 1

    def __prepare_scriptable__(self) -> torch.nn.Module:
        """``torch.jit.script`` compiles the layer as plain batch norm: TorchScript has no
        collectives, so it refuses while a process group of several processes would be used."""
        if _collectives.group_size(self.process_group, self._where()) > 1:
            raise RuntimeError(
                f"{self._where()}: torch.jit.script cannot synchronize statistics across processes; "
                "use torch.compile or torch.export (or script the model before init_process_group, "
                "for single-process use)"
            )
        return super().__prepare_scriptable__()

    def forward(self, input: Tensor, mask: Tensor | None = None) -> Tensor:
        """Normalize with statistics over the group in training; plain BN otherwise. ``mask``
        (N_r, *spatial) bool, True where a value is real: the statistics of the real values of
        all ranks (one collective, as without a mask), padded outputs 0."""
        if torch.jit.is_scripting():  # plain batch norm: __prepare_scriptable__ refuses a group
            return self._scripted_forward(input, mask)
        if isinstance(input, torch.fx.Proxy):  # under fx tracing: one node (nn/_fx.py)
            node = leaf_call(self, input, mask=mask)
            return node if node is not None else root_call(self, None, (input,))
        if not self._synchronized():
            return super().forward(input, mask)
        where = self._where()
        _checks.check_input(input, where, ndims=self._ndims, num_features=self.num_features)
        return _synchronized_step(
            input, self.weight, self.bias, self.running_mean, self.running_var, self.num_batches_tracked,
            self.track_running_stats, self.momentum, self.eps, self.process_group, where, self._skipped(), mask,
        )  # fmt: skip


def _synchronized_step(
    input: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    num_batches_tracked: Tensor | None,
    track_running_stats: bool,
    momentum: float | None,
    eps: float,
    group: object | None,
    where: str,
    num_batches_skipped: Tensor | None = None,
    mask: Tensor | None = None,
) -> Tensor:
    """A training forward over the group (input already checked)."""
    _checks.check_eps(eps, where, training=True)
    update = track_running_stats and running_mean is not None
    return sync_step(
        input,
        running_mean if update else None,
        running_var if update else None,
        weight,
        bias,
        momentum,
        eps,
        group,
        where,
        num_batches_tracked,
        num_batches_skipped,
        mask,
    )
