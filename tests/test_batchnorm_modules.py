"""BatchNorm1d/2d/3d as drop-ins for torch.nn.BatchNorm*d: parity over several steps."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

import batchnorm

CASES = [
    (batchnorm.BatchNorm1d, nn.BatchNorm1d, (8, 4)),
    (batchnorm.BatchNorm1d, nn.BatchNorm1d, (6, 4, 5)),
    (batchnorm.BatchNorm2d, nn.BatchNorm2d, (4, 4, 3, 5)),
    (batchnorm.BatchNorm3d, nn.BatchNorm3d, (3, 4, 2, 3, 4)),
]
OPTIONS = [
    dict(),
    dict(momentum=None),
    dict(momentum=0.5, eps=1e-3),
    dict(affine=False),
    dict(track_running_stats=False),
    dict(bias=False),
]


def _pair(ours: type, theirs: type, **kw: object) -> tuple[nn.Module, nn.Module]:
    a = ours(4, **kw).double()
    b = theirs(4, **kw).double()
    if a.weight is not None:
        with torch.no_grad():
            a.weight.copy_(torch.rand(4) + 0.5)
            if a.bias is not None:
                a.bias.copy_(torch.randn(4))
    b.load_state_dict(a.state_dict())
    return a, b


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


@pytest.mark.parametrize("case,options", list(itertools.product(CASES, OPTIONS)))
def test_training_and_eval_parity_over_steps(case: tuple, options: dict) -> None:
    ours, theirs, shape = case
    a, b = _pair(ours, theirs, **options)
    for step in range(4):
        x = (torch.randn(shape, dtype=torch.float64) * (step + 1) + step).requires_grad_(True)
        ya, yb = a(x), b(x)
        g = torch.randn_like(ya)
        params_a = [x] + [p for p in a.parameters()]
        params_b = [x] + [p for p in b.parameters()]
        grads_a = torch.autograd.grad(ya, params_a, g)
        grads_b = torch.autograd.grad(yb, params_b, g)
        assert _rel(ya, yb) < 1e-6
        for ga, gb in zip(grads_a, grads_b):
            assert _rel(ga, gb) < 1e-6
        for (na, ta), (nb, tb) in zip(a.state_dict().items(), b.state_dict().items()):
            assert na == nb
            if ta.is_floating_point():
                assert _rel(ta, tb) < 1e-6, na
            else:
                assert torch.equal(ta, tb), na
    a.eval()
    b.eval()
    x = torch.randn(shape, dtype=torch.float64) * 3
    assert _rel(a(x), b(x)) < 1e-6


@pytest.mark.parametrize("ours,theirs,shape", CASES)
def test_state_dict_moves_both_ways_strict(ours: type, theirs: type, shape: tuple) -> None:
    t = theirs(4)
    t(torch.randn(shape) + 2)
    o = ours(4)
    o.load_state_dict(t.state_dict(), strict=True)
    assert list(o.state_dict()) == list(t.state_dict())
    back = theirs(4)
    back.load_state_dict(o.state_dict(), strict=True)
    for k, v in t.state_dict().items():
        assert torch.equal(back.state_dict()[k], v)
    assert int(o.num_batches_tracked) == 1


def test_channels_last_module_parity() -> None:
    a, b = _pair(batchnorm.BatchNorm2d, nn.BatchNorm2d)
    x = torch.randn(4, 4, 5, 6, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    ya = a(x)
    assert ya.is_contiguous(memory_format=torch.channels_last)
    assert _rel(ya, b(x)) < 1e-10
    assert _rel(a.running_var, b.running_var) < 1e-12


def test_is_a_torch_batchnorm_for_third_party_tools() -> None:
    assert isinstance(batchnorm.BatchNorm2d(3), torch.nn.modules.batchnorm._BatchNorm)


def test_nonfinite_batch_skipped_warned_once_and_counter_kept() -> None:
    bn = batchnorm.BatchNorm1d(3)
    bn(torch.randn(8, 3))
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    bad = torch.randn(8, 3)
    bad[0, 0] = float("inf")
    with pytest.warns(RuntimeWarning, match="left unchanged"):
        y = bn(bad)
    assert not torch.isfinite(y[:, 0]).all()
    # second bad batch: no second warning (warnings are errors in this suite)
    bn(bad)
    for k, v in bn.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_empty_batch_changes_neither_stats_nor_counter() -> None:
    bn = batchnorm.BatchNorm2d(3, momentum=None)
    bn(torch.randn(4, 3, 2, 2))
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    y = bn(torch.randn(0, 3, 2, 2))
    assert y.shape == (0, 3, 2, 2)
    for k, v in bn.state_dict().items():
        assert torch.equal(v, before[k]), k
    # torch increments the counter on an empty batch, which skews momentum=None averages
    t = nn.BatchNorm2d(3, momentum=None)
    t(torch.randn(0, 3, 2, 2))
    assert int(t.num_batches_tracked) == 1


def test_cumulative_average_equals_mean_of_batches() -> None:
    bn = batchnorm.BatchNorm1d(2, momentum=None).double()
    batches = [torch.randn(10, 2, dtype=torch.float64) + i for i in range(5)]
    for xb in batches:
        bn(xb)
    torch.testing.assert_close(bn.running_mean, torch.stack([xb.mean(0) for xb in batches]).mean(0))
    torch.testing.assert_close(bn.running_var, torch.stack([xb.var(0) for xb in batches]).mean(0))


def test_parametrized_weight_is_read_like_torch() -> None:
    """The forward reads its parameters from the module's dicts, and a parameter moved out of
    them (a parametrization) as an attribute: the result is torch's layer's with the same one."""
    from torch.nn.utils import parametrize

    class Double(torch.nn.Module):
        def forward(self, w: torch.Tensor) -> torch.Tensor:
            return 2 * w

    ours, theirs = batchnorm.BatchNorm2d(3), torch.nn.BatchNorm2d(3)
    for layer in (ours, theirs):
        parametrize.register_parametrization(layer, "weight", Double())
        assert "weight" not in layer._parameters
    x = torch.randn(4, 3, 5, 5)
    torch.testing.assert_close(ours(x), theirs(x))
    torch.testing.assert_close(ours.running_var, theirs.running_var)
    x.requires_grad_()
    ours(x).pow(2).sum().backward()
    assert ours.parametrizations.weight.original.grad is not None
