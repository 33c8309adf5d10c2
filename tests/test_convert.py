"""convert(): torch BN <-> ours with state, mode, dtype and requires_grad kept."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import batchnorm


def _model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Sequential(nn.Flatten(), nn.Linear(4 * 6 * 6, 5), nn.BatchNorm1d(5, momentum=None, affine=False)),
    )


def test_convert_to_ours_and_back_keeps_outputs_and_state() -> None:
    model = _model().double()
    x = torch.randn(6, 3, 8, 8, dtype=torch.float64)
    model(x)  # populate running stats
    model[1].weight.requires_grad_(False)
    ours = batchnorm.convert(model)
    assert type(ours[1]) is batchnorm.BatchNorm2d
    assert type(ours[3][2]) is batchnorm.BatchNorm1d
    assert ours[3][2].momentum is None and not ours[3][2].affine
    assert not ours[1].weight.requires_grad
    assert ours[1].running_mean.dtype == torch.float64
    # original untouched (inplace=False)
    assert type(model[1]) is nn.BatchNorm2d
    for k, v in model.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v), k
    torch.testing.assert_close(ours(x), model(x), rtol=1e-12, atol=1e-12)
    model.eval()
    ours.eval()
    torch.testing.assert_close(ours(x), model(x), rtol=1e-12, atol=1e-12)
    back = batchnorm.convert(ours, to="torch")
    assert type(back[1]) is nn.BatchNorm2d and type(back[3][2]) is nn.BatchNorm1d
    assert not back.training
    torch.testing.assert_close(back(x), model(x), rtol=1e-12, atol=1e-12)


def test_convert_single_module_and_inplace() -> None:
    bn = nn.BatchNorm3d(2)
    assert type(batchnorm.convert(bn)) is batchnorm.BatchNorm3d
    model = _model()
    same = batchnorm.convert(model, inplace=True)
    assert same is model and type(model[1]) is batchnorm.BatchNorm2d


class _SharedBN(nn.Module):
    """One BatchNorm1d called twice, registered three times (twice in one parent)."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(3)
        self.body = nn.Sequential(self.bn, nn.Tanh(), self.bn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def test_convert_keeps_a_shared_batchnorm_shared() -> None:
    model = _SharedBN().double()
    x = torch.randn(8, 3, dtype=torch.float64)
    ours = batchnorm.convert(model)
    assert type(ours.bn) is batchnorm.BatchNorm1d
    assert ours.body[0] is ours.bn and ours.body[2] is ours.bn
    torch.testing.assert_close(ours(x), model(x), rtol=1e-12, atol=1e-12)  # two training steps
    torch.testing.assert_close(ours.bn.running_var, model.bn.running_var, rtol=1e-12, atol=1e-12)
    assert int(ours.bn.num_batches_tracked) == int(model.bn.num_batches_tracked) == 2
    back = batchnorm.convert(ours, to="torch")
    assert type(back.bn) is nn.BatchNorm1d and back.body[0] is back.bn and back.body[2] is back.bn


def test_convert_leaves_subclasses_alone() -> None:
    class MyBN(nn.BatchNorm1d):
        pass

    model = nn.Sequential(MyBN(3))
    assert type(batchnorm.convert(model)[0]) is MyBN


def test_convert_bad_arguments() -> None:
    with pytest.raises(ValueError, match="expected to='batchnorm' or to='torch', got 'keras'"):
        batchnorm.convert(_model(), to="keras")
    with pytest.raises(TypeError, match="expected an nn.Module, got int"):
        batchnorm.convert(3)  # type: ignore[arg-type]


def test_keras_conversion_says_so() -> None:
    c = batchnorm.from_keras(momentum=0.99, epsilon=1e-3)
    assert c.momentum == pytest.approx(0.01)
    assert c.eps == 1e-3
    assert "OLD" in c.note and "NEW" in c.note and "biased" in c.note
    bn = batchnorm.BatchNorm1d(3, **c.kwargs())
    assert bn.momentum == pytest.approx(0.01)
    assert batchnorm.to_keras_momentum(0.1) == pytest.approx(0.9)
    assert batchnorm.from_keras_momentum(batchnorm.to_keras_momentum(0.3)) == pytest.approx(0.3)
    # a bad Keras momentum is named as such (it used to say "PyTorch convention" and suggest
    # calling from_keras_momentum, the very function that refused it)
    with pytest.raises(ValueError, match=r"Keras/Flax momentum in \[0, 1\].*OLD.*got 99") as err:
        batchnorm.from_keras(momentum=99)
    assert "PyTorch" not in str(err.value)
    with pytest.raises(TypeError, match="from_keras_momentum: expected a Keras/Flax momentum"):
        batchnorm.from_keras_momentum(None)  # type: ignore[arg-type]


def test_keras_momentum_matches_keras_update_rule() -> None:
    """Keras: moving = m*moving + (1-m)*batch. Ours with from_keras_momentum(m) does the same."""
    m = 0.9
    x = torch.randn(16, 2, dtype=torch.float64) + 3
    bn = batchnorm.BatchNorm1d(2, momentum=batchnorm.from_keras_momentum(m)).double()
    bn(x)
    torch.testing.assert_close(bn.running_mean, m * torch.zeros(2, dtype=torch.float64) + (1 - m) * x.mean(0))
