"""The Python cost of a layer call, as a budget: Python function calls per step against torch's layer.

A call count is deterministic (``sys.setprofile`` counts every Python-level call, whatever the
machine's load), so it is a test; time is measured in ``benchmarks/``. One training step is
forward + backward of ``y.sum()`` on a fresh leaf input, one evaluation step a forward under
``no_grad``; both after three warm-up steps (kernels compiled, caches filled).

Budgets: BatchNorm1d/2d/3d at most 2x torch's BatchNorm*d, each variant at most 3x torch's
BatchNorm1d (the same shape), in both modes.

Run: PYTHONPATH=src python -m pytest -q tests/test_call_budget.py
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import pytest
import torch
from torch import nn

import batchnorm


def count_calls(layer: nn.Module, x: torch.Tensor, *, train: bool) -> int:
    """Python calls of one step of ``layer`` on ``x`` (after three warm-up steps)."""
    layer.train(train)

    def step() -> None:
        if train:
            layer(x.clone().requires_grad_()).sum().backward()
        else:
            with torch.no_grad():
                layer(x)

    for _ in range(3):
        step()
    calls = 0

    def profile(frame: object, event: str, arg: object) -> None:
        nonlocal calls
        if event == "call":
            calls += 1

    sys.setprofile(profile)
    try:
        step()
    finally:
        sys.setprofile(None)
    return calls


SHAPES = {1: (64, 512), 2: (16, 32, 8, 8), 3: (4, 16, 4, 4, 4)}
CHANNELS = {1: 512, 2: 32, 3: 16}
OURS = {1: batchnorm.BatchNorm1d, 2: batchnorm.BatchNorm2d, 3: batchnorm.BatchNorm3d}
THEIRS = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("d", [1, 2, 3])
def test_batchnorm_within_twice_torch(d: int, train: bool) -> None:
    x = torch.randn(*SHAPES[d])
    ours = count_calls(OURS[d](CHANNELS[d]), x, train=train)
    theirs = count_calls(THEIRS[d](CHANNELS[d]), x, train=train)
    assert ours <= 2 * theirs, f"BatchNorm{d}d {'train' if train else 'eval'}: {ours} calls, torch {theirs}"


VARIANTS: dict[str, Callable[[], nn.Module]] = {
    "ghost": lambda: batchnorm.GhostBatchNorm1d(512, virtual_batch_size=16),
    "renorm": lambda: batchnorm.BatchRenorm1d(512),
    "act": lambda: batchnorm.BatchNormAct1d(512),
    "frozen": lambda: batchnorm.FrozenBatchNorm1d(512),
    "sync_no_group": lambda: batchnorm.SyncBatchNorm(512),
}


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_variant_within_three_times_torch(name: str, train: bool) -> None:
    x = torch.randn(64, 512)
    ours = count_calls(VARIANTS[name](), x, train=train)
    theirs = count_calls(nn.BatchNorm1d(512), x, train=train)
    assert ours <= 3 * theirs, f"{name} {'train' if train else 'eval'}: {ours} calls, torch {theirs}"


def test_counter_sees_a_python_call() -> None:
    """The counter itself: a layer whose step makes one more Python call counts one more."""
    x = torch.randn(8, 4)
    plain = nn.BatchNorm1d(4)

    class Extra(nn.BatchNorm1d):
        def forward(self, input: torch.Tensor) -> torch.Tensor:
            return _identity(super().forward(input))

    assert count_calls(Extra(4), x, train=False) == count_calls(plain, x, train=False) + 2  # forward + _identity


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t
