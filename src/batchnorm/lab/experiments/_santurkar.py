"""Shared set-up of the three Santurkar et al. 2018 experiments (``santurkar2018-*``).

A deep ReLU MLP on the lab's data, with no normalization, with our ``BatchNorm1d`` before each
ReLU, or (noisy experiment) with :class:`batchnorm.lab.normalizers.NoisyBatchNorm`. All arms of
a seed start from weights drawn from the same generator: N(0, 2/fan_in) (He initialization, so
that the plain network trains at all at this depth; PyTorch's default init leaves a 10-layer
plain ReLU net at chance), biases 0.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..datasets import Dataset
from ..models import MLP, blocks

__all__ = ["build", "capture_act_inputs", "restore_buffers", "window_means"]


def build(data: Dataset, depth: int, width: int, norm: Any, seed: int) -> MLP:
    """The deep MLP: ``depth`` hidden layers of ``width`` ReLU units, He-initialized from ``seed``."""
    return MLP(
        data.features,
        [width] * depth,
        data.classes,
        act="relu",
        norm=norm,
        init_std="he",
        generator=torch.Generator().manual_seed(seed),
    )


class restore_buffers:
    """Context manager: snapshot every buffer (BN running statistics) and restore it on exit."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.saved: dict[str, Tensor] = {}

    def __enter__(self) -> nn.Module:
        self.saved = {name: buf.clone() for name, buf in self.model.named_buffers()}
        return self.model

    def __exit__(self, *exc: object) -> None:
        with torch.no_grad():
            for name, buf in self.model.named_buffers():
                buf.copy_(self.saved[name])


@torch.no_grad()
def capture_act_inputs(model: nn.Module, x: Tensor, layers: list[int], batch: int) -> dict[int, Tensor]:
    """Inputs of the activation of hidden blocks ``layers`` (0-based) over ``x``, with the network
    in training mode (BN uses batch statistics of each ``batch``-sized slice, noise is drawn),
    running statistics and training flags restored.

    Shape: x (N, D) -> {layer: (N', width)} with N' = batch * (N // batch).
    """
    hidden = list(blocks(model))
    captured: dict[int, list[Tensor]] = {i: [] for i in layers}
    handles = []
    for i in layers:

        def hook(_m: nn.Module, inp: tuple[Tensor, ...], i: int = i) -> None:
            captured[i].append(inp[0].clone())

        handles.append(hidden[i].act.register_forward_pre_hook(hook))
    flags = [(m, m.training) for m in model.modules()]
    try:
        with restore_buffers(model):
            model.train()
            for start in range(0, x.shape[0] - batch + 1, batch):
                model(x[start : start + batch])
    finally:
        for h in handles:
            h.remove()
        for m, flag in flags:
            m.training = flag
    return {i: torch.cat(v) for i, v in captured.items()}


def window_means(losses: list[float], edges: list[int]) -> list[float | None]:
    """Mean training loss over steps (edges[k-1], edges[k]] for each k >= 1 (None if empty or not finite)."""
    out: list[float | None] = []
    for a, b in zip(edges[:-1], edges[1:]):
        chunk = np.asarray(losses[a:b], dtype=float)
        out.append(float(chunk.mean()) if chunk.size and np.isfinite(chunk).all() else None)
    return out

