"""Double backward through a training forward on an empty batch (N = 0), checked against torch's layer.

An empty batch has no statistics; first and second derivatives are empty tensors or sums over no
values, i.e. zeros, exactly as torch's BatchNorm gives them (no NaN, no error).
"""

from __future__ import annotations

import pytest
import torch

import batchnorm
from batchnorm._kernels import torch_ops

SHAPES = {"BatchNorm1d": (0, 5, 9), "BatchNorm2d": (0, 5, 2, 2), "BatchNorm3d": (0, 5, 2, 2, 2)}


def _second_derivatives(layer: torch.nn.Module, shape: tuple[int, ...]) -> list[torch.Tensor]:
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    g = torch.randn_like(y, requires_grad=True)
    params = [layer.weight, layer.bias]
    dx, dw, db = torch.autograd.grad(y, [x, *params], g, create_graph=True)
    assert dx.shape == shape
    total = dx.sum() + (dw * torch.arange(1.0, 6.0, dtype=torch.float64)).sum() + db.sum()
    grads = torch.autograd.grad(total, [x, layer.weight, g], allow_unused=True)
    return [dw.detach(), db.detach(), *(t if t is not None else torch.zeros(()) for t in grads)]


@pytest.mark.parametrize("cls", sorted(SHAPES))
def test_empty_batch_double_backward_matches_torch(cls: str) -> None:
    shape = SHAPES[cls]
    ours = _second_derivatives(getattr(batchnorm, cls)(5).double(), shape)
    theirs = _second_derivatives(getattr(torch.nn, cls)(5).double(), shape)
    for a, b in zip(ours, theirs, strict=True):
        assert a.shape == b.shape
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_empty_batch_gradgradcheck() -> None:
    layer = batchnorm.BatchNorm2d(5, 1e-3, 0.3, False).double()
    x = torch.randn(0, 5, 2, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(layer, (x,))


def test_batch_stats_of_an_empty_batch_are_nan_per_channel() -> None:
    mean, var = torch_ops.batch_stats(torch.empty(0, 4, 3, 3))
    assert mean.shape == var.shape == (4,)
    assert torch.isnan(mean).all() and torch.isnan(var).all()
