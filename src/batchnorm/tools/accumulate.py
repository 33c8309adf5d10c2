"""``accumulate_statistics(model)``: one running-statistics update per optimizer step under
gradient accumulation.

With k micro-batches per optimizer step, every BN layer updates its running statistics k times,
each from one small, noisy micro-batch, and applies the momentum k times. Inside
``with accumulate_statistics(model):`` training forwards normalize exactly as before (with their
micro-batch's statistics: the gradients do not change), but no running statistic moves; each
layer records the (count, mean, M2) of every micro-batch it sees. When the block ends, the
records are merged exactly (Chan's formula, `batchnorm.tools.stats.Moments.merge`) and
applied ONCE with the layer's own rule (`batchnorm.ops.update_running_stats_`):

    n    = sum_k n_k,   mean = (1/n) sum_k n_k mean_k,   M2 = sum_k M2_k + sum_k n_k (mean_k - mean)^2
    running_mean = (1 - f) * running_mean + f * mean
    running_var  = (1 - f) * running_var  + f * M2 / (n - 1)               (unbiased over n)

with f = momentum, or 1 / (num_batches_tracked + 1) for ``momentum=None`` (the block counts as
one batch); ``num_batches_tracked`` grows by one. That is the update one forward of the
concatenated micro-batches would make, whatever their sizes. Batch renorm
(`batchnorm.BatchRenorm1d`) stores a moving std: it gets sqrt(M2 / n + eps), as its own
forward would; its micro-batches all see the running statistics of the block's start.

How (generic, also for ``torch.nn.BatchNorm*d``/``torch.nn.SyncBatchNorm`` and any
``_BatchNorm`` subclass): a forward pre-hook on each layer lets the forward run on copies of its
buffers, and a forward hook puts the untouched originals back and records the moments of the input (over all dims but the
channel dim; only the real positions when the call has a ``mask``). A forward recomputed by
activation checkpointing (inside a backward) records nothing. ``SyncBatchNorm`` layers that ran
synchronized are merged across their process group at the end, in one collective per group
(`batchnorm.tools.stats.all_reduce_moments`): every rank must leave the block (as every
rank calls the layer). DDP's ``no_sync`` only concerns gradients and composes with the block.

An exception inside the block (even inside a layer's forward) leaves every buffer as it was at
the block's start, discards what was recorded, and propagates. Costs one more read of each layer input per micro-batch
(the moments in float64) and a copy of the layer's buffers; nothing outside the block.
Not for use under ``torch.compile`` of the forward (the hooks read values on the host).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import SyncBatchNorm as _TorchSyncBatchNorm
from torch.nn.modules.batchnorm import _BatchNorm

from .. import ops
from ..distributed.collectives import group_size
from ..nn.renorm import BatchRenormBase
from ..nn.sync import SyncBatchNorm
from ..ops.masked import masked_moments
from .stats import Moments, _layer_input, all_reduce_moments

__all__ = ["accumulate_statistics"]

_ACTIVE: set[int] = set()  # ids of the layers some open block is recording


def _is_tracking(module: nn.Module) -> bool:
    """A layer whose training forward updates running statistics."""
    return isinstance(module, (_BatchNorm, BatchRenormBase)) and getattr(module, "running_mean", None) is not None


def batch_moments(module: nn.Module, x: Tensor, mask: Tensor | None) -> Moments:
    """(count, mean, M2) per channel of one layer input, as the layer's update sees it: over every
    dim but the channel dim (``module.channel_dim``, default 1), real positions only with a mask."""
    x = x.detach()
    channel_dim = getattr(module, "channel_dim", 1)
    if channel_dim != 1 and x.dim() > 2:
        x = x.movedim(channel_dim, 1)  # (N, C, *)
    if mask is not None:  # the real positions only, in float64
        count, mean, var = masked_moments(x.to(torch.float64), mask)
        return Moments(count, mean, var * count)
    return Moments.from_tensor(x, [0, *range(2, x.dim())])


class _Recorder:
    """The hooks and records of one ``accumulate_statistics`` block.

    A training forward runs on copies of the layer's buffers (swapped in by the pre-hook, its
    update lands there); the forward hook puts the originals back. The originals are never
    written, so autograd's saved tensors stay valid (torch's layers save their running
    statistics for the backward) and every forward of the block sees the block's start state.
    """

    def __init__(self, layers: list[tuple[str, nn.Module]]) -> None:
        self.layers = layers
        self.pending: dict[int, Moments] = {}
        self.synced: dict[int, Any] = {}  # layer id -> process group, for layers that ran synchronized
        self.in_flight: dict[int, tuple[nn.Module, dict[str, Tensor]]] = {}

    def pre(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if module.training:
            originals = {k: b for k, b in module._buffers.items() if b is not None}
            self.in_flight[id(module)] = (module, originals)
            for k, b in originals.items():
                module._buffers[k] = b.clone()

    def post(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        entry = self.in_flight.pop(id(module), None)
        if entry is None:
            return
        module._buffers.update(entry[1])
        if ops.recomputing():  # activation checkpointing re-ran this forward: recorded already
            return
        part = batch_moments(module, _layer_input(module, args, kwargs), kwargs.get("mask"))
        key = id(module)
        self.pending[key] = part if key not in self.pending else self.pending[key].merge(part)
        group = _sync_group(module)
        if group is not False:
            self.synced[key] = group

    def restore(self) -> None:
        """Put back the buffers of forwards that did not finish (an exception inside one)."""
        for module, originals in self.in_flight.values():
            module._buffers.update(originals)
        self.in_flight.clear()

    def apply(self) -> None:
        """Merge across process groups, then one update per layer that recorded something."""
        groups: dict[int, tuple[Any, list[int]]] = {}
        for key, group in self.synced.items():
            groups.setdefault(id(group), (group, []))[1].append(key)
        for group, keys in groups.values():
            for key, merged in zip(keys, all_reduce_moments([self.pending[k] for k in keys], group)):
                self.pending[key] = merged
        for _, m in self.layers:
            part = self.pending.get(id(m))
            if part is not None:
                _update(m, part)


def _sync_group(module: Any) -> Any:
    """The process group a SyncBatchNorm forward synchronized over, or False (no collective)."""
    if not isinstance(module, (SyncBatchNorm, _TorchSyncBatchNorm)):
        return False
    group = module.process_group
    return group if group_size(group, "accumulate_statistics") > 1 else False


def _update(module: Any, part: Moments) -> None:
    """One running-statistics update of ``module`` (a tracking BN layer) with the merged
    moments ``part``: the layer's own rule, count n = part.count."""
    n = int(part.count)
    if n == 0:
        return
    where = f"accumulate_statistics: {type(module).__name__}({module.num_features})"
    var = (part.m2 / n).clamp_min(0.0)  # biased, float64
    scratch = torch.zeros((), dtype=torch.long, device=part.mean.device)
    tracked = module.num_batches_tracked if module.num_batches_tracked is not None else scratch.clone()
    skipped = getattr(module, "num_batches_skipped", None)
    skipped = scratch if skipped is None else skipped
    if isinstance(module, BatchRenormBase):  # a moving std: sqrt(biased var + eps), as its forward
        stats, batch, unbiased = cast(Tensor, module.running_std), torch.sqrt(var + module.eps), False
    else:
        stats, batch, unbiased = module.running_var, var, True
    ops.update_running_stats_(
        module.running_mean, stats, tracked, skipped, part.mean, batch, n, module.momentum, where, unbiased
    )


@contextlib.contextmanager
def accumulate_statistics(model: nn.Module) -> Iterator[nn.Module]:
    """Defer every BN layer's running-statistics updates in ``model`` to the end of the block, then
    apply one exact update with all the micro-batches together (see the module docstring).

    Example::

        with batchnorm.accumulate_statistics(model):
            for micro in batch.split(8):
                loss_fn(model(micro)).backward()
        optimizer.step()

    Yields ``model``. Raises ``TypeError`` for a non-module and ``ValueError`` when a layer of
    ``model`` is already inside another open block.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"accumulate_statistics: expected a torch.nn.Module, got {type(model).__name__}")
    layers = [(name, m) for name, m in model.named_modules() if _is_tracking(m)]
    busy = [name or "<model>" for name, m in layers if id(m) in _ACTIVE]
    if busy:
        raise ValueError(
            f"accumulate_statistics: layer(s) {', '.join(busy)} are already inside an open "
            "accumulate_statistics block (blocks over the same layers do not nest)"
        )
    rec = _Recorder(layers)
    handles = []
    ok = False
    _ACTIVE.update(id(m) for _, m in layers)
    try:
        for _, m in layers:
            handles.append(m.register_forward_pre_hook(rec.pre, with_kwargs=True, prepend=True))
            handles.append(m.register_forward_hook(rec.post, with_kwargs=True))
        yield model
        ok = True
    finally:
        for h in handles:
            h.remove()
        _ACTIVE.difference_update(id(m) for _, m in layers)
        rec.restore()
        if ok:
            rec.apply()
