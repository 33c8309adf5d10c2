"""Lab model builders: placement, bias rule, norm factories, init.

PYTHONPATH=src python -m pytest -q tests/lab/test_models.py
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import batchnorm
from batchnorm.lab.models import MLP, ConvNet, blocks, count_parameters, resolve_norm


def test_mlp_before_placement_matches_hand_written_forward() -> None:
    torch.manual_seed(0)
    model = MLP(6, [5, 4], 3, act="sigmoid", norm="bn", placement="before")
    x = torch.randn(16, 6, dtype=torch.float32)
    b1, b2 = list(blocks(model))
    assert isinstance(b1.norm, batchnorm.BatchNorm1d)
    assert b1.layer.bias is None  # bias before BN is redundant: dropped by "auto"

    def bn(h: torch.Tensor) -> torch.Tensor:
        return (h - h.mean(0)) / torch.sqrt(h.var(0, unbiased=False) + 1e-5)

    h = torch.sigmoid(bn(x @ b1.layer.weight.T))
    h = torch.sigmoid(bn(h @ b2.layer.weight.T))
    expected = h @ model.head.weight.T + model.head.bias
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)


def test_mlp_after_placement_keeps_bias_and_normalizes_the_activation() -> None:
    model = MLP(6, [5], 3, act="relu", norm=nn.BatchNorm1d, placement="after")
    block = next(blocks(model))
    assert block.layer.bias is not None
    assert isinstance(block.norm, nn.BatchNorm1d)
    x = torch.randn(32, 6)
    h = torch.relu(block.layer(x))
    h = (h - h.mean(0)) / torch.sqrt(h.var(0, unbiased=False) + 1e-5)
    torch.testing.assert_close(model(x), model.head(h), rtol=1e-5, atol=1e-5)


def test_bias_option_and_parameter_count() -> None:
    with_bias = MLP(10, [7], 2, norm="bn", bias=True)
    auto = MLP(10, [7], 2, norm="bn")
    assert count_parameters(with_bias) - count_parameters(auto) == 7
    assert count_parameters(auto) == 10 * 7 + 2 * 7 + 7 * 2 + 2


def test_gaussian_init_std_and_zero_bias() -> None:
    gen = torch.Generator().manual_seed(3)
    model = MLP(200, [300], 10, act="sigmoid", init_std=0.1, generator=gen)
    w = next(blocks(model)).layer.weight.detach()
    assert abs(float(w.std()) - 0.1) < 0.003
    assert float(next(blocks(model)).layer.bias.detach().abs().max()) == 0.0
    again = MLP(200, [300], 10, act="sigmoid", init_std=0.1, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(next(blocks(again)).layer.weight, w)


@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 40)])
def test_convnet_uses_batch_norm_of_the_right_rank_and_trains(shape: tuple[int, ...]) -> None:
    model = ConvNet(shape, (4, 8), 10, norm="bn")
    first = next(blocks(model))
    assert isinstance(first.norm, batchnorm.BatchNorm2d if len(shape) == 3 else batchnorm.BatchNorm1d)
    x = torch.randn(5, int(torch.tensor(shape).prod()))
    y = torch.randint(0, 10, (5,))
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    grad = first.layer.weight.grad
    assert grad is not None and float(grad.abs().sum()) > 0
    assert model(x).shape == (5, 10)


def test_bad_options_raise() -> None:
    with pytest.raises(ValueError, match="resolve_norm"):
        resolve_norm("layer")
    with pytest.raises(ValueError, match="activation"):
        MLP(3, [2], 2, act="swish")
    with pytest.raises(ValueError, match="placement"):
        MLP(3, [2], 2, placement="middle")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="ConvNet"):
        ConvNet((8,), (4,), 2)
