"""Tests for FrozenBatchNorm1d/2d/3d.

PYTHONPATH=src python -m pytest -q tests/test_frozen.py
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.testing import assert_close

from batchnorm import BatchNorm1d, BatchNorm2d, FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d


def filled(layer: nn.Module) -> nn.Module:
    with torch.no_grad():
        layer.running_mean.normal_(0, 2)
        layer.running_var.uniform_(0.1, 3)
        layer.weight.normal_()
        layer.bias.normal_()
    return layer


@pytest.mark.parametrize(
    "cls,shape",
    [
        (FrozenBatchNorm1d, (4, 3)),
        (FrozenBatchNorm1d, (4, 3, 5)),
        (FrozenBatchNorm2d, (4, 3, 5, 2)),
        (FrozenBatchNorm3d, (2, 3, 2, 3, 2)),
    ],
)
def test_forward_matches_numpy_in_both_modes(cls: type, shape: tuple[int, ...]) -> None:
    layer = filled(cls(3, eps=1e-3))
    x = torch.randn(shape)
    view = (1, 3) + (1,) * (len(shape) - 2)
    rm, rv, w, b = (
        t.double().numpy().reshape(view) for t in (layer.running_mean, layer.running_var, layer.weight, layer.bias)
    )
    ref = w * (x.double().numpy() - rm) / np.sqrt(rv + 1e-3) + b
    for mode in (True, False):
        layer.train(mode)
        np.testing.assert_allclose(layer(x).double().numpy(), ref, rtol=1e-5, atol=1e-6)
    assert list(layer.parameters()) == []
    assert layer.running_var.grad_fn is None and int(layer.num_batches_tracked) == 0


def test_same_function_as_eval_batchnorm_and_checkpoint_both_ways() -> None:
    bn = filled(nn.BatchNorm2d(3))
    bn.num_batches_tracked.fill_(7)
    bn.eval()
    frozen = FrozenBatchNorm2d(3)
    frozen.load_state_dict(bn.state_dict(), strict=True)
    assert frozen.state_dict().keys() == bn.state_dict().keys()
    x = torch.randn(4, 3, 5, 5)
    with torch.no_grad():
        assert_close(frozen.train()(x), bn(x), rtol=1e-5, atol=1e-6)
    ours = BatchNorm2d(3)
    ours.load_state_dict(frozen.state_dict(), strict=True)
    assert int(ours.num_batches_tracked) == 7
    assert torch.equal(ours.running_var, bn.running_var)


def test_loads_affine_false_checkpoint_as_identity_affine() -> None:
    bn = nn.BatchNorm1d(2, affine=False)
    with torch.no_grad():
        bn.running_mean.fill_(3.0)
        bn.running_var.fill_(4.0)
    frozen = FrozenBatchNorm1d(2, eps=0.0)
    frozen.load_state_dict(bn.state_dict(), strict=True)
    assert_close(frozen(torch.full((1, 2), 5.0)), torch.full((1, 2), 1.0))


def test_half_input_and_from_batchnorm() -> None:
    bn = filled(nn.BatchNorm2d(3)).eval()
    frozen = FrozenBatchNorm2d.from_batchnorm(bn)
    x = torch.randn(2, 3, 4, 4)
    y = frozen(x.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16
    with torch.no_grad():
        assert_close(y.float(), bn(x.to(torch.bfloat16).float()), rtol=1e-2, atol=1e-2)
    with pytest.raises(ValueError, match="no running statistics"):
        FrozenBatchNorm2d.from_batchnorm(nn.BatchNorm2d(3, track_running_stats=False))


def test_large_mean_small_spread_float32_matches_batchnorm_eval() -> None:
    x64 = (1e4 + 1e-2 * torch.randn(32, 2, dtype=torch.float64)).float().double()
    frozen = FrozenBatchNorm1d(2)
    with torch.no_grad():
        frozen.running_mean.copy_(x64.mean(0))
        frozen.running_var.fill_(1e-4)
        frozen.weight.copy_(torch.tensor([1.5, -0.5]))
        frozen.bias.copy_(torch.tensor([0.25, 1.0]))
    want = (x64 - frozen.running_mean.double()) / torch.sqrt(frozen.running_var.double() + 1e-5)
    want = want * frozen.weight.double() + frozen.bias.double()
    # x * scale + shift (the old order) was off by 5e-2 here; our BatchNorm1d eval by 5e-8
    assert (frozen(x64.float()).double() - want).abs().max() < 1e-5
    ours = BatchNorm1d(2).eval()
    ours.load_state_dict(frozen.state_dict())
    with torch.no_grad():
        assert (ours(x64.float()).double() - want).abs().max() < 1e-5  # the same bar


def test_input_errors() -> None:
    with pytest.raises(ValueError, match="4D"):
        FrozenBatchNorm2d(3)(torch.randn(2, 3))
    with pytest.raises(ValueError, match="channels"):
        FrozenBatchNorm1d(3)(torch.randn(2, 4))
    with pytest.raises(ValueError, match="num_features"):
        FrozenBatchNorm1d(0)
    with pytest.raises(ValueError, match="eps"):
        FrozenBatchNorm1d(2, eps=-1.0)
