"""``channel_dim=-1``: (N, L, C) sequences normalized per C without permuting.

Against torch's BatchNorm1d on the permuted input: outputs, gradients, running statistics; the
state_dict is torch's; (N, C) input is unchanged.

Run: PYTHONPATH=src python -m pytest -q tests/test_channel_dim.py
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.fx
from torch import nn

import batchnorm

C = 6


@pytest.mark.parametrize("shape", [(4, 7, C), (5, C)])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_layer_matches_torch_on_permuted_input(shape: tuple[int, ...], momentum: float | None) -> None:
    ours = batchnorm.BatchNorm1d(C, momentum=momentum, channel_dim=-1).double()
    theirs = nn.BatchNorm1d(C, momentum=momentum).double()
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        ours.bias.uniform_(-1, 1)
    theirs.load_state_dict(ours.state_dict())
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    for step in range(3):
        x = torch.randn(*shape, dtype=torch.float64) * (step + 1) + step
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya = ours(xa)
        yb = theirs(xb.movedim(-1, 1)).movedim(1, -1) if len(shape) == 3 else theirs(xb)
        assert ya.shape == x.shape and ya.is_contiguous()
        w = torch.randn(shape, dtype=torch.float64)
        (ya * w).sum().backward()
        (yb * w).sum().backward()
        torch.testing.assert_close(ya, yb)
        torch.testing.assert_close(xa.grad, xb.grad)
        torch.testing.assert_close(ours.weight.grad, theirs.weight.grad)
        torch.testing.assert_close(ours.bias.grad, theirs.bias.grad)
    for k, v in theirs.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[k], v, msg=k)
    ours.eval()
    theirs.eval()
    x = torch.randn(*shape, dtype=torch.float64)
    expected = theirs(x.movedim(-1, 1)).movedim(1, -1) if len(shape) == 3 else theirs(x)
    torch.testing.assert_close(ours(x), expected)


def test_functional_matches_permuted() -> None:
    x = torch.randn(3, 5, C)
    rm, rv = torch.zeros(C), torch.ones(C)
    rm2, rv2 = rm.clone(), rv.clone()
    y = batchnorm.batch_norm(x, rm, rv, training=True, channel_dim=-1)
    expected = batchnorm.batch_norm(x.movedim(-1, 1), rm2, rv2, training=True).movedim(1, -1)
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    torch.testing.assert_close(rm, rm2, rtol=0, atol=0)
    torch.testing.assert_close(rv, rv2, rtol=0, atol=0)


def test_errors_and_repr() -> None:
    with pytest.raises(ValueError, match="channel_dim"):
        batchnorm.BatchNorm2d(C, channel_dim=-1)
    with pytest.raises(ValueError, match="channel_dim"):
        batchnorm.BatchNorm1d(C, channel_dim=2)
    layer = batchnorm.BatchNorm1d(C, channel_dim=-1)
    assert "channel_dim=-1" in repr(layer)
    with pytest.raises(ValueError, match="last dim"):
        layer(torch.randn(4, C, 3))
    with pytest.raises(ValueError, match="channel_dim"):
        batchnorm.batch_norm(torch.randn(4, C), None, None, training=True, channel_dim=0)


def test_accumulate_reads_the_last_dim() -> None:
    layer = batchnorm.BatchNorm1d(C, channel_dim=-1).double()
    ref = nn.BatchNorm1d(C).double()
    xs = [torch.randn(n, 3, C, dtype=torch.float64) + n for n in (2, 5)]
    with batchnorm.accumulate_statistics(layer):
        for x in xs:
            layer(x)
    ref(torch.cat(xs).movedim(-1, 1))
    torch.testing.assert_close(layer.running_mean, ref.running_mean)
    torch.testing.assert_close(layer.running_var, ref.running_var)


@pytest.mark.filterwarnings("ignore:`torch.jit.*is deprecated:DeprecationWarning")
def test_script_keeps_channel_dim_and_mask() -> None:
    """The scripted layer runs the layer's own step: channels last and a mask work as in eager."""
    torch.manual_seed(0)
    eager = batchnorm.BatchNorm1d(C, channel_dim=-1).double()
    scripted = torch.jit.script(copy.deepcopy(eager))
    for n in (4, 3):
        x = torch.randn(n, 5, C, dtype=torch.float64) * 3 + 1
        mask = torch.rand(n, 5) > 0.3
        torch.testing.assert_close(scripted(x, mask), eager(x, mask), rtol=0, atol=0)
    # TorchScript also lists non-persistent buffers (num_batches_skipped) in a state_dict
    got = scripted.state_dict()
    torch.testing.assert_close({key: got[key] for key in eager.state_dict()}, eager.state_dict(), rtol=0, atol=0)
    scripted.eval()
    eager.eval()
    x = torch.randn(2, 5, C, dtype=torch.float64)
    torch.testing.assert_close(scripted(x), eager(x), rtol=0, atol=0)


def test_fx_trace_keeps_channel_dim() -> None:
    layer = batchnorm.BatchNorm1d(C, channel_dim=-1)
    traced = torch.fx.symbolic_trace(layer)
    x = torch.randn(4, 5, C)
    torch.testing.assert_close(traced(x), batchnorm.BatchNorm1d(C, channel_dim=-1)(x))
