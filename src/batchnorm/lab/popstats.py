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
from torch.optim.swa_utils import update_bn

from .training import minibatches

__all__ = ["population_statistics"]


@torch.no_grad()
def population_statistics(model: nn.Module, x: Tensor, *, batch_size: int, generator: torch.Generator) -> nn.Module:
    """A copy of ``model`` (left as it is), in eval mode, whose BatchNorm running statistics are Alg. 2's
    estimates: torch's ``update_bn`` (cumulative averages, ``momentum=None``; each layer's momentum
    restored) runs it in training mode without gradients, over one pass of ceil(N / m) batches of
    m = ``batch_size`` rows of ``x`` (N, ...) in an order ``generator`` seeds (dropout, if any,
    stays active); every batch has the same m (``minibatches``), as Alg. 2's m/(m-1) assumes."""
    new = copy.deepcopy(model)
    stream = minibatches(x.shape[0], batch_size, generator)
    update_bn((x[next(stream)] for _ in range(-(-x.shape[0] // batch_size))), new)
    return new.eval()
