"""Shared set-up of the three Santurkar et al. 2018 experiments (``santurkar2018-*``; docs/lab.md
and each one's ``.md``): a deep ReLU MLP, He-initialized, N(0, 2/fan_in), biases 0 (PyTorch's
default init leaves a 10-layer plain ReLU net at chance), plain, with BN, or with noisy BN written
as BN followed by :class:`NoisyReLU` (an activation sees each seed's slice of a stacked run).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..datasets import Dataset
from ..declare import mlp_for, seeded
from ..models import MLP, blocks

__all__ = ["COLORS", "EPOCHS", "LABELS", "NoisyReLU", "build", "noisy", "probe_batch", "seed_slot", "window_means"]

LABELS = {"none": "no BN", "bn": "BN", "noisy": "noisy BN"}
COLORS = {"none": "tab:gray", "bn": "tab:blue", "noisy": "tab:orange"}
EPOCHS = {"quick": 40.0, "full": 300.0}
"""Passes over the training set in quick and full mode, in batches of 128 (``_calibration.epoch_rule``)."""


def probe_batch(x: Tensor, y: Tensor, k: int, size: int = 128) -> tuple[Tensor, Tensor]:
    """The batch measured at the ``k``-th checkpoint: ``size`` consecutive training examples, a
    different slice at each checkpoint."""
    start = (k * size) % max(1, x.shape[0] - size)
    idx = torch.arange(start, start + size)
    return x[idx], y[idx]


class NoisyReLU(nn.Module):
    """``relu(y * s * (1 + p e) + mu + p e')``: Santurkar et al.'s noise of magnitude ``a`` on a BN
    output ``y``, then the ReLU (tested equal to a reference noisy BN layer followed by a ReLU,
    drawing in the same order from the same kind of generator).

    At every training-mode forward, for each seed k (slice k of a stacked (S, B, C) input, or
    the only one of a (B, C) input) and unit j, with ``a = magnitudes[k] >= 0``: ``mu ~ U(-a, a)``,
    ``s ~ U(1, 1 + a)`` from ``generators[k]``, then per sample ``e, e' ~ N(0, 1)`` with ``p = a / 5``.
    In eval mode the noise is replaced by its expectation: ``relu(y * (2 + a) / 2)``. A (B, C) input
    is seed ``slot`` (default 0; set it to evaluate or probe one seed's model alone). ``relu`` is a
    submodule, so a forward-pre-hook on it sees the noisy input of the ReLU (the next layer's
    "input distribution").

    Shape: (B, C) -> (B, C) or (S, B, C) -> (S, B, C) with S = len(generators).
    """

    def __init__(self, generators: Sequence[torch.Generator], magnitudes: Sequence[float]) -> None:
        super().__init__()
        if not generators or len(generators) != len(magnitudes) or min(magnitudes) < 0:
            raise ValueError(
                f"NoisyReLU: expected one generator and one magnitude >= 0 per seed, got {len(generators)} and {list(magnitudes)}"
            )
        self.generators = list(generators)
        self.noise_mean = [float(a) for a in magnitudes]  # mu's bound
        self.noise_scale = [1.0 + a for a in self.noise_mean]  # s's upper bound
        self.per_sample = [a / 5.0 for a in self.noise_mean]  # p
        self.slot = 0
        self.relu = nn.ReLU()

    def _noise(self, y: Tensor, k: int) -> Tensor:
        if not self.training:
            return y * (0.5 * (1.0 + self.noise_scale[k]))
        n, c = y.shape
        g = self.generators[k]
        shift = (torch.rand(c, generator=g) * 2.0 - 1.0) * self.noise_mean[k]  # (C,)
        scale = 1.0 + torch.rand(c, generator=g) * (self.noise_scale[k] - 1.0)  # (C,)
        mult = 1.0 + self.per_sample[k] * torch.randn(n, c, generator=g)  # (B, C)
        add = self.per_sample[k] * torch.randn(n, c, generator=g)  # (B, C)
        return y * scale * mult + shift + add

    def forward(self, y: Tensor) -> Tensor:
        if y.dim() == 2:
            return self.relu(self._noise(y, self.slot))
        if y.dim() != 3 or y.shape[0] != len(self.generators):
            raise ValueError(f"NoisyReLU: expected (B, C) or ({len(self.generators)}, B, C), got {tuple(y.shape)}")
        return self.relu(torch.stack([self._noise(y[k], k) for k in range(y.shape[0])]))


def noisy(models: Sequence[MLP], acts: Sequence[NoisyReLU]) -> None:
    """In place: replace every hidden ReLU of each BN model by noise + ReLU. ``acts``: one
    ``NoisyReLU`` per hidden layer, shared by all models (the stacked forward uses the first
    model's activations on the (S, B, C) slices). Raises ValueError, changing nothing, unless they
    match in number."""
    if depths := sorted({len(list(blocks(m))) for m in models} - {len(acts)}):
        raise ValueError(f"noisy: expected one NoisyReLU per hidden layer ({depths}), got {len(acts)}")
    for m in models:
        for block, a in zip(blocks(m), acts):
            block.act = a


@contextlib.contextmanager
def seed_slot(model: nn.Module, k: int) -> Iterator[None]:
    """Context manager: every ``NoisyReLU`` of ``model`` treats a (B, C) input as seed ``k``."""
    acts = [m for m in model.modules() if isinstance(m, NoisyReLU)]
    saved = [a.slot for a in acts]
    try:
        for a in acts:
            a.slot = k
        yield
    finally:
        for a, v in zip(acts, saved):
            a.slot = v


def build(data: Dataset, depth: int, width: int, norm: Any, seed: int) -> MLP:
    """The deep MLP: ``depth`` hidden layers of ``width`` ReLU units, He-initialized from ``seed``."""
    return mlp_for(data, [width] * depth, act="relu", norm=norm, init_std="he", generator=seeded(seed))


def window_means(losses: list[float], edges: list[int]) -> list[float | None]:
    """Mean training loss over steps (edges[k-1], edges[k]] for each k >= 1 (None if empty or not finite)."""
    out: list[float | None] = []
    for a, b in zip(edges[:-1], edges[1:]):
        chunk = np.asarray(losses[a:b], dtype=float)
        out.append(float(chunk.mean()) if chunk.size and np.isfinite(chunk).all() else None)
    return out
