"""Population statistics for inference (Ioffe & Szegedy 2015, Alg. 2), computed inside the lab.

    E[x]   = mean over B of mu_B
    Var[x] = m/(m-1) * mean over B of sigma_B^2          (sigma_B^2 biased, per batch of m)

An average of per-batch moments, what BN saw in training; not the variance of the whole
training set (that is ``batchnorm.recompute_statistics``).
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .training import minibatches

__all__ = ["population_statistics"]


@torch.no_grad()
def population_statistics(
    model: nn.Module,
    x: Tensor,
    *,
    batch_size: int,
    generator: torch.Generator,
    num_batches: int | None = None,
) -> nn.Module:
    """A copy of ``model`` whose BatchNorm running statistics are Alg. 2's population estimates.

    With the weights frozen, the whole copy runs in training mode over training batches of m,
    as Alg. 2 prescribes (dropout, if any, stays active); with ``momentum=None`` each BatchNorm
    keeps the *cumulative* average of the batch means and of the *unbiased* batch variances
    m/(m-1)·sigma_B^2, exactly Alg. 2 when every batch has the same m (as ``minibatches`` gives).

    Args:
        model: any model with BatchNorm layers (``torch.nn`` or ours); it is not modified.
        x: training inputs (N, ...) to average over.
        batch_size: m, the training batch size (the m/(m-1) correction uses it).
        generator: seeds the batch order.
        num_batches: how many batches to average; default: one pass, ceil(N / m).

    Returns:
        the copy, in eval mode, with ``momentum`` restored to each layer's original value.
    """
    new = copy.deepcopy(model)
    layers = [m for m in new.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    saved = [m.momentum for m in layers]
    count = num_batches if num_batches is not None else -(-x.shape[0] // batch_size)
    try:
        for m in layers:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the batches below
        new.train()
        stream = minibatches(x.shape[0], batch_size, generator)
        for _ in range(count):
            new(x[next(stream)])
    finally:
        for m, momentum in zip(layers, saved):
            m.momentum = momentum
    new.eval()
    return new
